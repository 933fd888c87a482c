"""Admissible steps in belief space (Li & Li, arXiv 2605.06741; docs/geometry.md, docs/belief_support.md).

On the simplex, with tangent space T = {v : Σ v_i = 0}, the CE energy E(p) = −Σ y_k log p_k has Hessian diag(y/p²)
and Fisher proxy diag(1/p). Of the rules (``RULES``, formulas in ``max_step``) "paper" is the paper's KL-contraction
certificate (near the fixed point only), "sharp" and "tangent" are thresholds of the Fisher proxy, and "support" is
the threshold below which the projected step is Euclidean-nonexpansive (not contracting). ``belief_step_cap`` pulls a
rule back to a parameter step to *first order* only; ``belief_radius`` is that cap never beyond a certified radius
≤ ρ*: the bound to cap steps with. Inputs (..., K), float64 inside, one value per belief (...). Beliefs on the closed
simplex are accepted; negative entries, |Σ p − 1| > 1e-6, non-finite values, empty input or K < 2 raise ValueError.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .checks import as_float64, check_belief, same_shape, softmax_line
from .radius import radius_lower_bound
from .weighted import weighted_radius

__all__ = ["RULES", "normalized_entropy", "barrier", "backoff", "max_step", "ads_step", "mse_step", "belief_step_cap",
           "CertifiedRadius", "spread_radius", "belief_radius"]

RULES = ("paper", "sharp", "tangent", "support")
_BISECTION_STEPS = 64  # halvings of a log-width <= 1500: leaves a relative error below 1e-16


def _entropy_deficit(p: Tensor, k: Tensor | int) -> Tensor:
    """1 − B(p) = Σ p_i log(k p_i)/log k = KL(p‖uniform)/log k over k live classes (1 where k = 1: a vertex).

    Accurate where B → 1 (no cancellation); masked classes hold p_i = 0 and add nothing."""
    k = torch.as_tensor(k, dtype=p.dtype)
    log_k = torch.where(k > 1, k, 2.0).log()
    deficit = torch.special.xlogy(p, k.unsqueeze(-1) * p).sum(dim=-1) / log_k
    return torch.where(k > 1, deficit, 1.0).clamp(0.0, 1.0)


def _alpha_from_deficit(deficit: Tensor, eps: float) -> Tensor:
    """α = max(0, −log(deficit + ε)), where deficit = 1 − B (α >= 0, so the backoff never exceeds 1)."""
    return (-torch.log(deficit + eps)).clamp(min=0.0)


def _softmax(z: Tensor) -> Tensor:
    """exp(z − max z)/Σ exp(z − max z) over the last dimension (−inf gives 0); torch.softmax threads tiny inputs."""
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
    """1/(1 + α(B(p))) ∈ (0, 1]: 1 for a one-hot belief, → 0 as p → uniform (exactly 0 there when ε = 0)."""
    q = check_belief(p, "p")
    return 1.0 / (1.0 + _alpha_from_deficit(_entropy_deficit(q, q.shape[-1]), _check_eps(eps)))


def _secular_threshold(e: Tensor, live: Tensor) -> Tensor:
    """2/θ_max, θ_max = λ_max of diag(1/e) compressed to the tangent space of the live face; e ∈ [0, ∞], per row:
    bisection in log σ = −log θ on the secular equation f(σ) = Σ_{e_i < ∞} e_i/(σ − e_i) − #{e_i = ∞}, decreasing on
    σ ∈ [e_(1), min(e_(2), e_(1)·k/(k − 1))] (docs/belief_support.md). e_(1) = 0 gives 0. Rows need k >= 2 live."""
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

    θ_max is the largest eigenvalue on T. ``target`` y (shape of p) is for "support" only; without it y = p, where it
    equals "tangent" (but classes with p_k = 0 carry no curvature). A one-hot target e_c gives 2·p_c²·K/(K − 1)."""
    q, live, y = _rule_inputs(p, rule, target)
    return _max_step(q, rule, live, y)


def ads_step(p: Tensor, rule: str = "paper", eps: float = 1e-10, *, target: Tensor | None = None) -> Tensor:
    """η_ADS(p) = η_max(p)/(1 + α(B(p))) (paper eq. 19–21 for rule="paper"); ``target`` as in ``max_step``."""
    q, live, y = _rule_inputs(p, rule, target)
    return _max_step(q, rule, live, y) / (1.0 + _alpha_from_deficit(_entropy_deficit(q, q.shape[-1]), _check_eps(eps)))


def mse_step(p: Tensor | None = None, *, B: Tensor | float | None = None, eps: float = 1e-10) -> Tensor:
    """η_MSE = 1/(1 + α(B)) (endpoint 1) of exactly one of a belief ``p`` (..., K) or entropies ``B=`` (...) in [0, 1].

    With ``p`` it equals ``backoff(p, eps)``.
    """
    if (p is None) == (B is None):
        raise ValueError("mse_step needs exactly one of a belief p (positional) or normalized entropies B= (keyword)")
    return backoff(p, eps) if p is not None else 1.0 / (1.0 + barrier(B, eps))


def _row_labels(labels: Tensor | list, live: Tensor) -> Tensor:
    """Validated integer labels, one per row of ``live`` (..., K), each naming a live (not −inf) class; int64 (...)."""
    y = torch.as_tensor(labels)
    if y.numel() and (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    y = y.to(torch.int64)
    k = live.shape[-1]
    if y.numel() and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got range [{y.min().item()}, {y.max().item()}]")
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


def belief_step_cap(logits: Tensor, logit_slopes: Tensor, labels: Tensor | None = None, rule: str = "paper",
                    backoff: bool = True, eps: float = 1e-10, *, smoothing: float = 0.0) -> Tensor:
    """τ_max,n = η_adm(p_n)·‖P_T g_n‖/‖J_s(p_n) a_n‖, the largest τ with first-order η_eff,n(τ) <= η_adm(p_n).

    **First order, not a bound**: it can exceed the row's radius ρ* (and be inf while the row's loss explodes along
    the step); to cap steps use ``belief_radius``. A step τ moves the logits by τ·a_n (a = ``logit_slopes``) and the
    belief by Δp_n ≈ τ·J_s a_n, J_s = diag(p) − ppᵀ; η_eff,n = ‖Δp_n‖/‖P_T g_n‖ with g_n = −y_n/p_n, and
    η_adm = ``max_step(p, rule)``, times 1/(1 + α(B)) when ``backoff``. y_n = (1 − s)·e_label + s/k over the k live
    classes (s = ``smoothing``, PyTorch's ``label_smoothing``). "support" with a one-hot label compares the label
    coordinate's own move: τ_max = 2/|d log p_c/dτ| times the backoff (docs/belief_support.md §6).
    Masked classes (−inf logits) are dropped: p, the rules, B and T live on the face of the k live classes; a row
    with one live class gives inf. Without labels the label is argmax p: the worst case over one-hot labels for the
    Fisher rules, the predicted label only for "support" (docs/belief_support.md §5). Returns (...): inf where
    J_s a = 0, 0 where a Fisher rule's η_adm = 0 (a live p underflows); the one-hot "support" cap needs no p_c².
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
    """π/Δ_a over the live slopes: the cheapest certified lower bound on ρ* for ``belief_radius`` (inf at Δ_a = 0)."""
    _, a, live = softmax_line(logits, logit_slopes)
    return radius_lower_bound(a, live=live)


def belief_radius(logits: Tensor, logit_slopes: Tensor, labels: Tensor | None = None, rule: str = "support",
                  backoff: bool = True, eps: float = 1e-10, *, smoothing: float = 0.0,
                  certified: CertifiedRadius = weighted_radius) -> Tensor:
    """τ_n = min(τ_max,n, R_n): the belief rule's first-order pull-back, never beyond a certified radius R_n <= ρ*_n.

    τ_max,n is ``belief_step_cap`` with the same arguments; R_n = ``certified(logits, logit_slopes)`` must be a
    certified lower bound on ρ*_n (default R_w of ``weighted_radius``, >= π/Δ_a; ``spread_radius`` gives π/Δ_a). So
    τ_n <= ρ*_n for every row whatever the rule; no belief criterion bounds the loss on its own (a belief move is
    bounded, the loss is not: docs/belief_support.md §6.1). NaN radii propagate: no certificate.
    """
    cap = belief_step_cap(logits, logit_slopes, labels, rule, backoff, eps, smoothing=smoothing)
    radius = torch.as_tensor(certified(logits, logit_slopes), dtype=torch.float64, device=cap.device)
    if radius.shape != cap.shape:
        raise ValueError(f"certified returned shape {tuple(radius.shape)}; one radius per row needs {tuple(cap.shape)}")
    return torch.minimum(cap, radius)
