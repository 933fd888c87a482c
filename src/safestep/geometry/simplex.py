"""Admissible steps in belief space (Li & Li, arXiv 2605.06741; docs/geometry.md, docs/belief_support.md).

A belief p lies on the simplex Δ = {p_i >= 0, Σ p_i = 1}; its tangent space is T = {v : Σ v_i = 0}.
The CE energy E(p) = −Σ y_k log p_k has the Hessian diag(y/p²). Its Fisher proxy diag(1/p) (exact at the fixed
point p = y; the expected Hessian over labels y ~ p) gives the local constants μ = 1/max p (strong convexity) and
L = 1/min p (smoothness). Step-size rules (``RULES``):

* ``"paper"``   the paper's certificate 2μ/L² = 2·min p²/max p (sufficient, loose);
* ``"sharp"``   the gradient-step threshold 2/L = 2·min p of a convex L-smooth energy;
* ``"tangent"`` the exact local threshold 2/θ_max of the projected step at p = y, θ_max = λ_max of diag(1/p) on T;
* ``"support"`` 2/θ_max for the energy of a given target y, θ_max = λ_max of the true Hessian diag(y/p²) on T.
  Curvature lives on the support of y only: for a one-hot label c it is 2·p_c²·K/(K − 1), free of the vocabulary
  size. Below it the *projected* step is Euclidean-*nonexpansive* (not contracting: a one-hot energy has μ = 0, and
  KL between two beliefs can grow); taken at both beliefs of a pair this holds for any target, but with a soft
  target the projected step can land where p_k = 0 < y_k (E = +∞). The mirror step keeps p > 0 and, for a one-hot
  label, lowers E for every η > 0 (docs/belief_support.md §3).

Guarantees, stated exactly: "paper" is the paper's KL-contraction certificate, which holds near the fixed point only
(the rigorous global form is Euclidean); "sharp"/"tangent" are thresholds of the Fisher proxy; "support" is a
nonexpansiveness threshold. ``belief_step_cap`` pulls any of them back to a parameter step to *first order* only;
``belief_radius`` is that cap never beyond a certified radius ≤ ρ* (R_w of ``weighted_radius`` by default, or
π/Δ_a): the bound to cap steps with.

The first three use the Fisher proxy and need no target; "support" takes a target (default: the fixed point y = p,
where it equals "tangent"; ``belief_step_cap`` builds it from the labels). The entropy backoff 1/(1 + α(B)),
α(B) = −log(1 − B), shrinks every rule for diffuse beliefs. All functions take (..., K) tensors, work in float64
and return one value per belief with shape (...). Beliefs on the closed simplex (zeros allowed) are accepted;
negative entries, |Σ p − 1| > 1e-6, non-finite values, empty input or K < 2 raise ValueError.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ._checks import as_float64, check_belief, check_labels, same_shape, softmax_line
from .radius import radius_lower_bound
from .weighted import weighted_radius

__all__ = [
    "RULES",
    "normalized_entropy",
    "barrier",
    "backoff",
    "max_step",
    "ads_step",
    "mse_step",
    "belief_step_cap",
    "CertifiedRadius",
    "spread_radius",
    "belief_radius",
]

RULES = ("paper", "sharp", "tangent", "support")
_BISECTION_STEPS = 64  # halvings of a log-width <= 1500: leaves a relative error below 1e-16


def _entropy_deficit(p: Tensor, k: Tensor | int) -> Tensor:
    """1 − B(p) = Σ p_i log(k p_i)/log k = KL(p‖uniform)/log k over k live classes (1 where k = 1: a vertex).

    Accurate where B → 1 (no cancellation). Masked classes hold p_i = 0 and add nothing.
    """
    k = torch.as_tensor(k, dtype=p.dtype)
    log_k = torch.where(k > 1, k, 2.0).log()
    deficit = torch.special.xlogy(p, k.unsqueeze(-1) * p).sum(dim=-1) / log_k
    return torch.where(k > 1, deficit, 1.0).clamp(0.0, 1.0)


def _alpha_from_deficit(deficit: Tensor, eps: float) -> Tensor:
    """α = max(0, −log(deficit + ε)), where deficit = 1 − B (α >= 0, so the backoff never exceeds 1)."""
    return (-torch.log(deficit + eps)).clamp(min=0.0)


def _softmax(z: Tensor) -> Tensor:
    """exp(z − max z)/Σ exp(z − max z) over the last dimension (entries of −inf give 0).

    Written out because torch.softmax parallelises even tiny inputs: on a loaded machine each call then costs
    milliseconds, which dominates loops of small belief updates.
    """
    e = (z - z.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def _check_eps(eps: float) -> float:
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; valid rules are {', '.join(repr(r) for r in RULES)}")
    return rule


def normalized_entropy(p: Tensor) -> Tensor:
    """B(p) = H(p)/log K with H(p) = −Σ p_i log p_i and 0·log 0 = 0; B ∈ [0, 1]."""
    q = check_belief(p, "p")
    return 1.0 - _entropy_deficit(q, q.shape[-1])


def barrier(B: Tensor | float, eps: float = 1e-10) -> Tensor:
    """α(B) = max(0, −log(1 − B + ε)); ε = 0 gives the exact barrier (inf at B = 1)."""
    b = as_float64(B, "B")
    if ((b < 0) | (b > 1)).any():
        lo, hi = b.min().item(), b.max().item()
        raise ValueError(f"B is a normalized entropy and must lie in [0, 1], got range [{lo:.6g}, {hi:.6g}]")
    return _alpha_from_deficit(1.0 - b, _check_eps(eps))


def backoff(p: Tensor, eps: float = 1e-10) -> Tensor:
    """1/(1 + α(B(p))) ∈ (0, 1]: 1 for a one-hot belief, → 0 as p → uniform (exactly 0 there when ε = 0).

    1 − B is computed as KL(p‖uniform)/log K, so the barrier is accurate for nearly uniform beliefs.
    """
    q = check_belief(p, "p")
    return 1.0 / (1.0 + _alpha_from_deficit(_entropy_deficit(q, q.shape[-1]), _check_eps(eps)))


def _secular_threshold(e: Tensor, live: Tensor) -> Tensor:
    """2/θ_max, θ_max = λ_max of diag(1/e) compressed to the tangent space of the live face; e ∈ [0, ∞], per row.

    The compression's eigenvalues θ solve Σ_live 1/(1/e_i − θ) = 0, i.e. in σ = 1/θ the secular equation
    f(σ) = Σ_{e_i < ∞} e_i/(σ − e_i) − #{e_i = ∞} = 0 (classes with e_i = ∞ carry no curvature). The largest θ has
    σ ∈ [e_(1), min(e_(2), e_(1)·k/(k − 1))] (interlacing with the two smallest e, and the Rayleigh quotient of
    P_T e_(1)), where f decreases; bisection runs on log σ. e_(1) = 0 gives threshold 0. Rows need k >= 2 live.
    """
    k = live.sum(dim=-1).to(e.dtype)
    e = torch.where(live, e, math.inf)
    two_smallest = torch.topk(e, 2, dim=-1, largest=False).values
    lo = two_smallest[..., 0]
    hi = torch.minimum(two_smallest[..., 1], lo * k / (k - 1))
    positive = lo > 0
    log_lo = torch.where(positive, lo, 1.0).log()
    log_hi = torch.where(positive, hi, 1.0).log()
    finite = torch.isfinite(e)
    curvature_free = (live & ~finite).sum(dim=-1).to(e.dtype)
    for _ in range(_BISECTION_STEPS):
        log_mid = 0.5 * (log_lo + log_hi)
        sigma = log_mid.exp().unsqueeze(-1)
        secular = torch.where(finite, e / (sigma - e), 0.0).sum(dim=-1) - curvature_free
        root_is_right = secular > 0  # f decreases in σ: positive means σ is left of the root
        log_lo = torch.where(root_is_right, log_mid, log_lo)
        log_hi = torch.where(root_is_right, log_hi, log_mid)
    sigma = (0.5 * (log_lo + log_hi)).exp()
    return torch.where(positive, 2.0 * sigma, 0.0)


def _max_step(p: Tensor, rule: str, live: Tensor, target: Tensor | None = None) -> Tensor:
    """η_max(p) of ``rule`` on the live face; "support" uses ``target`` (None: the fixed point y = p)."""
    if rule == "support":
        y = p if target is None else target
        return _secular_threshold(torch.where(y > 0, p**2 / y, math.inf), live)
    if rule == "tangent":
        return _secular_threshold(p, live)
    least = torch.where(live, p, math.inf).amin(dim=-1)
    if rule == "sharp":
        return 2.0 * least
    return 2.0 * least**2 / p.amax(dim=-1)


def _rule_inputs(p: Tensor, rule: str, target: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validated (belief, all-live mask, target) for ``max_step`` and ``ads_step``."""
    q = check_belief(p, "p")
    if _check_rule(rule) != "support" and target is not None:
        raise ValueError(f"target is used by rule 'support' only; rule {rule!r} uses the Fisher proxy diag(1/p)")
    y = None if target is None else check_belief(target, "target")
    if y is not None:
        same_shape(q, y, "p", "target")
    return q, torch.ones_like(q, dtype=torch.bool), y


def max_step(p: Tensor, rule: str = "paper", *, target: Tensor | None = None) -> Tensor:
    """η_max(p): "paper" 2·min p²/max p, "sharp" 2·min p, "tangent" 2/θ_max(diag(1/p)), "support" 2/θ_max(diag(y/p²)).

    θ_max is the largest eigenvalue on the tangent space T. ``target`` y (same shape as p) is used by "support" only;
    without it "support" sits at the fixed point y = p, where it equals "tangent" (except that classes with p_k = 0
    carry no curvature). A one-hot target e_c gives 2·p_c²·K/(K − 1).
    """
    q, live, y = _rule_inputs(p, rule, target)
    return _max_step(q, rule, live, y)


def ads_step(p: Tensor, rule: str = "paper", eps: float = 1e-10, *, target: Tensor | None = None) -> Tensor:
    """η_ADS(p) = η_max(p)/(1 + α(B(p))) (paper eq. 19–21 for rule="paper"); ``target`` as in ``max_step``."""
    q, live, y = _rule_inputs(p, rule, target)
    return _max_step(q, rule, live, y) / (1.0 + _alpha_from_deficit(_entropy_deficit(q, q.shape[-1]), _check_eps(eps)))


def mse_step(p: Tensor | None = None, *, B: Tensor | float | None = None, eps: float = 1e-10) -> Tensor:
    """η_MSE = 1/(1 + α(B)) (endpoint η^MSE_max = 1); pass a belief ``p`` positionally or entropies as ``B=``.

    Exactly one of ``p`` (shape (..., K)) and the keyword-only ``B`` (shape (...), values in [0, 1]) must be given;
    the result then has shape (...). With ``p`` the value equals ``backoff(p, eps)``.
    """
    if (p is None) == (B is None):
        raise ValueError("mse_step needs exactly one of a belief p (positional) or normalized entropies B= (keyword)")
    if p is not None:
        return backoff(p, eps)
    return 1.0 / (1.0 + barrier(B, eps))


def _row_labels(labels: Tensor | list, live: Tensor) -> Tensor:
    """Validated labels, one per row of ``live`` (..., K), each naming a live (not −inf) class; int64 of shape (...)."""
    y = check_labels(labels, live.shape[-1])
    if y.shape != live.shape[:-1]:
        want = tuple(live.shape[:-1])
        raise ValueError(f"labels has shape {tuple(y.shape)} but logits needs {want} (one label per row)")
    if not live.gather(-1, y.unsqueeze(-1)).all():
        raise ValueError("a label names a masked class (−inf logit): its cross-entropy is infinite")
    return y


def _label_target(label: Tensor, live: Tensor, smoothing: float) -> Tensor:
    """y = (1 − s)·e_label + s·1_live/k_live: the label-smoothed target spread over the live classes only."""
    k = live.sum(dim=-1, keepdim=True).to(torch.float64)
    one_hot = torch.zeros(live.shape, dtype=torch.float64, device=live.device).scatter_(-1, label.unsqueeze(-1), 1.0)
    return (1.0 - smoothing) * one_hot + smoothing * live / k


def _tangent_norm(v: Tensor, live: Tensor) -> Tensor:
    """‖P_T v‖ on the live face: the norm of v − mean_live(v) over the live classes."""
    centred = v - (v * live).sum(dim=-1, keepdim=True) / live.sum(dim=-1, keepdim=True)
    return torch.linalg.vector_norm(torch.where(live, centred, 0.0), dim=-1)


def _check_smoothing(smoothing: float) -> float:
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be a float in [0, 1), got {smoothing!r}")
    return float(smoothing)


def belief_step_cap(
    logits: Tensor,
    logit_slopes: Tensor,
    labels: Tensor | None = None,
    rule: str = "paper",
    backoff: bool = True,
    eps: float = 1e-10,
    *,
    smoothing: float = 0.0,
) -> Tensor:
    """τ_max,n = η_adm(p_n)·‖P_T g_n‖/‖J_s(p_n) a_n‖, the largest τ with first-order η_eff,n(τ) <= η_adm(p_n).

    **First order, not a bound**: it can exceed the row's convergence radius ρ* (and can be inf while the row's
    loss explodes along the step); to cap steps use ``belief_radius``, which never exceeds a certified radius.
    First-order pull-back (docs/geometry.md): a step τ moves logits by τ·a_n (a = ``logit_slopes``, dz/dτ) and the
    belief by Δp_n ≈ τ·J_s a_n with J_s = diag(p) − ppᵀ; the effective belief-space step is
    η_eff,n = ‖Δp_n‖/‖P_T g_n‖ with g_n = −y_n/p_n the CE gradient, and η_adm = ``max_step(p, rule)``, times
    ``1/(1 + α(B))`` when ``backoff`` is true. The target y_n is the one-hot label, label-smoothed with ``smoothing``
    s: y = (1 − s)·e_label + s/k over the k live classes (PyTorch's ``label_smoothing``).

    Rule "support" with a one-hot label c compares moves along the energy's only curved direction, the label
    coordinate: η_eff = |Δp_c|/|(P_T g)_c| with (P_T g)_c = −(1 − 1/k)/p_c and Δp_c ≈ τ·p_c·(a_c − Σ_k p_k a_k), so
    τ_max = η_adm·(k − 1)/(k·p_c²·|a_c − ā|) = 2/|d log p_c/dτ| (times the backoff): to first order a step may
    change the row's loss −log p_c by at most 2 nats (docs/belief_support.md §6).

    Masked classes (−inf logits) are dropped: p, the rules, B and T are taken on the face of the k live classes,
    and their slopes are ignored whatever their value. A row with one live class cannot move: τ_max = inf.
    Without labels we take the predicted class argmax p_n as the label. For the Fisher rules ("paper", "sharp",
    "tangent") this is the worst case over one-hot labels (the smallest ‖P_T g‖, hence the smallest cap), so the
    cap stays valid whatever the true label is. For "support" it is not: its cap depends on the label's own slope,
    so without labels it certifies the step for the predicted label only (docs/belief_support.md).
    The locally normalized proxy y = p cannot be used: its gradient −1 is normal to the simplex, P_T g = 0, and the
    cap would be 0 for every sample. Returns shape (...); inf where J_s a = 0 (the belief does not move), except
    that for the Fisher rules η_adm = 0 (only when a live entry of p underflows to 0) gives 0, the conservative
    choice; the one-hot "support" cap 2/|d log p_c/dτ| needs no p_c² and survives an underflowing p_c.
    """
    z, a, live = softmax_line(logits, logit_slopes)
    _check_rule(rule)
    s = _check_smoothing(smoothing)
    k = live.sum(dim=-1).to(torch.float64)
    p = _softmax(z)
    label = p.argmax(dim=-1) if labels is None else _row_labels(labels, live)
    y = _label_target(label, live, s)
    shrink = 1.0 / (1.0 + _alpha_from_deficit(_entropy_deficit(p, k), _check_eps(eps))) if backoff else 1.0
    centred = a - a.amax(dim=-1, keepdim=True)  # J_s ignores constant shifts; this makes J_s(c·1) exactly 0
    mean = (p * centred).sum(dim=-1, keepdim=True)
    if rule == "support" and s == 0.0:  # only the label coordinate is curved: compare the label's own move
        # η_adm·(k − 1)/(k·p_c²) = 2 exactly: p_c² cancels, so a label probability that underflows costs nothing
        label_speed = (centred.gather(-1, label.unsqueeze(-1)) - mean).squeeze(-1).abs()  # |d log p_c/dτ|
        cap = torch.where(label_speed > 0, 2.0 * shrink / label_speed, math.inf)
        return torch.where(k > 1, cap, math.inf)
    eta_adm = _max_step(p, rule, live, y if rule == "support" else None) * shrink
    tangent_grad_norm = _tangent_norm(torch.where(y > 0, -y / p, 0.0), live)
    belief_speed = torch.linalg.vector_norm(p * (centred - mean), dim=-1)
    cap = torch.where(belief_speed > 0, eta_adm * tangent_grad_norm / belief_speed, math.inf)
    cap = torch.where(eta_adm > 0, cap, 0.0)
    return torch.where(k > 1, cap, math.inf)


CertifiedRadius = Callable[[Tensor, Tensor], Tensor]
"""(logits, slopes) of shape (..., K) → a radius per row (...) that is <= ρ*; −inf logits mark masked classes."""


def spread_radius(logits: Tensor, logit_slopes: Tensor) -> Tensor:
    """π/Δ_a with Δ_a the spread of the live slopes: a certified lower bound on ρ* (inf where Δ_a = 0).

    The cheapest certified radius for ``belief_radius``; masked classes (−inf logits) are left out of the spread.
    """
    _, a, live = softmax_line(logits, logit_slopes)
    return radius_lower_bound(a, live=live)


def belief_radius(
    logits: Tensor,
    logit_slopes: Tensor,
    labels: Tensor | None = None,
    rule: str = "support",
    backoff: bool = True,
    eps: float = 1e-10,
    *,
    smoothing: float = 0.0,
    certified: CertifiedRadius = weighted_radius,
) -> Tensor:
    """τ_n = min(τ_max,n, R_n): the belief rule's first-order pull-back, never beyond a certified radius R_n <= ρ*_n.

    τ_max,n is ``belief_step_cap`` with the same arguments (the rule's admissible belief step, pulled back to first
    order); R_n = ``certified(logits, logit_slopes)`` must be a certified lower bound on the row's convergence
    radius ρ*_n (default R_w, ``geometry.weighted_radius``, which weighs classes by probability and is >= π/Δ_a;
    ``spread_radius`` gives π/Δ_a). So τ_n <= ρ*_n for every row whatever the rule: a step of length
    τ_n along the slopes keeps the row's linearized cross-entropy inside the disk where its Taylor series converges,
    and, where the pull-back binds, moves the belief no more than the rule admits to first order.
    Why the minimum is needed (docs/belief_support.md §6): a belief move is bounded (‖Δp‖₁ <= 2) while the loss
    is not, so no belief-space criterion, first order or exact along the path, can bound the loss on its own.
    NaN radii (non-finite input to ``certified``) propagate: no certificate.
    """
    cap = belief_step_cap(logits, logit_slopes, labels, rule, backoff, eps, smoothing=smoothing)
    radius = torch.as_tensor(certified(logits, logit_slopes), dtype=torch.float64, device=cap.device)
    if radius.shape != cap.shape:
        raise ValueError(f"certified returned shape {tuple(radius.shape)}; one radius per row needs {tuple(cap.shape)}")
    return torch.minimum(cap, radius)
