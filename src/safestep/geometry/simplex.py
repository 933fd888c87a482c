"""Admissible steps in belief space (Li & Li, arXiv 2605.06741; MATH_BELIEF.md).

A belief p lies on the simplex Δ = {p_i >= 0, Σ p_i = 1}; its tangent space is T = {v : Σ v_i = 0}.
The CE energy E(p) = −Σ y_k log p_k has the curvature proxy diag(1/p) (exact at the fixed point p = y, and the
categorical Fisher information), hence the local constants μ = 1/max p (strong convexity) and L = 1/min p
(smoothness). Step-size rules (``RULES``):

* ``"paper"``   the paper's certificate 2μ/L² = 2·min p²/max p (sufficient, loose);
* ``"sharp"``   the gradient-step threshold 2/L = 2·min p of a convex L-smooth energy;
* ``"tangent"`` the exact local threshold 2/θ_max of the projected step at p = y, θ_max = λ_max of diag(1/p) on T.

The entropy backoff 1/(1 + α(B)), α(B) = −log(1 − B), shrinks every rule for diffuse beliefs. All functions take
(..., K) tensors, work in float64 and return one value per belief with shape (...). Beliefs on the closed simplex
(zeros allowed) are accepted; negative entries, |Σ p − 1| > 1e-6, non-finite values or K < 2 raise ValueError.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import as_float64, check_belief, check_labels, check_nonnegative, class_vectors, same_shape

__all__ = [
    "RULES",
    "normalized_entropy",
    "barrier",
    "backoff",
    "max_step",
    "ads_step",
    "mse_step",
    "project_to_simplex",
    "projected_step",
    "mirror_step",
    "contraction_factor",
    "anchor",
    "belief_step_cap",
]

RULES = ("paper", "sharp", "tangent")
GRADIENT_FLOOR = 1e-12  # p is floored at this value inside the CE gradient −y/p (MATH_BELIEF.md §7)
_BISECTION_STEPS = 64  # halvings of a log-width <= 1500: leaves a relative error below 1e-16


def _entropy_deficit(p: Tensor) -> Tensor:
    """1 − B(p) = Σ p_i log(K p_i)/log K = KL(p‖uniform)/log K, accurate where B → 1 (no cancellation)."""
    k = p.shape[-1]
    return (torch.special.xlogy(p, k * p).sum(dim=-1) / math.log(k)).clamp(0.0, 1.0)


def _alpha_from_deficit(deficit: Tensor, eps: float) -> Tensor:
    """α = −log(deficit + ε), where deficit = 1 − B."""
    return -torch.log(deficit + eps)


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


def normalized_entropy(p: Tensor) -> Tensor:
    """B(p) = H(p)/log K with H(p) = −Σ p_i log p_i and 0·log 0 = 0; B ∈ [0, 1]."""
    return 1.0 - _entropy_deficit(check_belief(p, "p"))


def barrier(B: Tensor | float, eps: float = 1e-10) -> Tensor:
    """α(B) = −log(1 − B + ε); ε = 0 gives the exact barrier (inf at B = 1)."""
    b = as_float64(B, "B")
    if ((b < 0) | (b > 1)).any():
        lo, hi = b.min().item(), b.max().item()
        raise ValueError(f"B is a normalized entropy and must lie in [0, 1], got range [{lo:.6g}, {hi:.6g}]")
    return _alpha_from_deficit(1.0 - b, _check_eps(eps))


def backoff(p: Tensor, eps: float = 1e-10) -> Tensor:
    """1/(1 + α(B(p))): 1 for a one-hot belief, → 0 as p → uniform (exactly 0 there when ε = 0).

    1 − B is computed as KL(p‖uniform)/log K, so the barrier is accurate for nearly uniform beliefs.
    """
    q = check_belief(p, "p")
    return 1.0 / (1.0 + _alpha_from_deficit(_entropy_deficit(q), _check_eps(eps)))


def _tangent_threshold(p: Tensor) -> Tensor:
    """2/θ_max with θ_max = λ_max(diag(1/p)) on T, via the secular equation Σ_i p_i/(σ − p_i) = 0, σ = 1/θ.

    The eigenvalues of diag(d) compressed to 1^⊥ solve Σ_i 1/(d_i − θ) = 0; with d = 1/p and σ = 1/θ the largest
    one has σ ∈ [p_(1), p_(2)] (the two smallest entries; interlacing), where the secular function is decreasing.
    Bisection runs on log σ. Ties p_(1) = p_(2) give σ = p_(1); p_(1) = 0 gives θ_max = ∞ and threshold 0.
    """
    two_smallest = torch.topk(p, 2, dim=-1, largest=False).values
    lo, hi = two_smallest[..., 0], two_smallest[..., 1]
    positive = lo > 0
    log_lo = torch.where(positive, lo, torch.ones_like(lo)).log()
    log_hi = torch.where(positive, hi, torch.ones_like(hi)).log()
    for _ in range(_BISECTION_STEPS):
        log_mid = 0.5 * (log_lo + log_hi)
        sigma = log_mid.exp().unsqueeze(-1)
        secular = (p / (sigma - p)).sum(dim=-1)
        root_is_right = secular > 0  # the secular function decreases in σ: positive means σ is left of the root
        log_lo = torch.where(root_is_right, log_mid, log_lo)
        log_hi = torch.where(root_is_right, log_hi, log_mid)
    sigma = (0.5 * (log_lo + log_hi)).exp()
    return torch.where(positive, 2.0 * sigma, torch.zeros_like(sigma))


def _max_step(p: Tensor, rule: str) -> Tensor:
    if rule == "paper":
        return 2.0 * p.amin(dim=-1) ** 2 / p.amax(dim=-1)
    if rule == "sharp":
        return 2.0 * p.amin(dim=-1)
    if rule == "tangent":
        return _tangent_threshold(p)
    raise ValueError(f"unknown rule {rule!r}; valid rules are {', '.join(repr(r) for r in RULES)}")


def max_step(p: Tensor, rule: str = "paper") -> Tensor:
    """η_max(p): "paper" 2μ/L² = 2·min p²/max p, "sharp" 2/L = 2·min p, "tangent" 2/θ_max (exact at p = y)."""
    return _max_step(check_belief(p, "p"), rule)


def ads_step(p: Tensor, rule: str = "paper", eps: float = 1e-10) -> Tensor:
    """η_ADS(p) = η_max(p)/(1 + α(B(p))) (paper eq. 19–21 for rule="paper")."""
    q = check_belief(p, "p")
    return _max_step(q, rule) / (1.0 + _alpha_from_deficit(_entropy_deficit(q), _check_eps(eps)))


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


def project_to_simplex(v: Tensor) -> Tensor:
    """Π_Δ(v) = argmin_{q∈Δ} ‖q − v‖₂ over the last dimension (sort-based algorithm, Duchi et al. 2008)."""
    x = class_vectors(v, "v", min_classes=1)
    u = torch.sort(x, dim=-1, descending=True).values
    cumulative = u.cumsum(dim=-1) - 1.0
    j = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    support = (u - cumulative / j > 0).sum(dim=-1, keepdim=True)  # the condition holds exactly on a prefix
    theta = cumulative.gather(-1, support - 1) / support
    return (x - theta).clamp(min=0.0)


def _step_inputs(p: Tensor, target: Tensor, eta: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    q = check_belief(p, "p")
    y = check_belief(target, "target")
    same_shape(q, y, "p", "target")
    lr = check_nonnegative(eta, "eta").unsqueeze(-1)
    return q, y, lr


def projected_step(p: Tensor, target: Tensor, eta: Tensor | float) -> Tensor:
    """F_η(p) = Π_Δ(p − η∇E(p)) with the CE gradient ∇E = −target/max(p, 1e-12).

    ``eta`` is a scalar or a (...) tensor broadcasting against the batch dimensions of ``p``.
    """
    q, y, lr = _step_inputs(p, target, eta)
    return project_to_simplex(q + lr * y / q.clamp(min=GRADIENT_FLOOR))


def mirror_step(p: Tensor, target: Tensor, eta: Tensor | float) -> Tensor:
    """Entropic mirror descent p' = softmax(log p + η·target/max(p, 1e-12)) (exponentiated gradient on CE).

    ``eta`` is a scalar or a (...) tensor broadcasting against the batch dimensions of ``p``; zero entries of p stay 0.
    """
    q, y, lr = _step_inputs(p, target, eta)
    return _softmax(q.log() + lr * y / q.clamp(min=GRADIENT_FLOOR))


def contraction_factor(p1: Tensor, p2: Tensor, eta: Tensor | float) -> Tensor:
    """q(η) = 1 − η(2μ − ηL²)/C with μ = 1/max(p1 ∪ p2), L = 1/min(p1 ∪ p2), C = 1/min p2 (paper eq. 14).

    The proxy constants μ = 1/max p, L = 1/min p are taken at the worse of the two beliefs: max_i p_i is convex and
    min_i p_i concave, so these are the proxy constants valid on the whole segment [p1, p2], and they reduce to the
    paper's constants at p when p1 = p2 = p (where q < 1 iff η < max_step(p)). C = 1/min p2 is the χ² constant of
    KL(p1‖p2) <= C‖p1 − p2‖². The KL contraction KL(F p1‖F p2) <= q·KL(p1‖p2) is a local statement near the fixed
    point (MATH_BELIEF.md §3); the rigorous global statement is Euclidean with factor √(1 − 2ημ + η²L²).
    """
    a = check_belief(p1, "p1")
    b = check_belief(p2, "p2")
    same_shape(a, b, "p1", "p2")
    lr = check_nonnegative(eta, "eta")
    mu = 1.0 / torch.maximum(a.amax(dim=-1), b.amax(dim=-1))
    lipschitz = 1.0 / torch.minimum(a.amin(dim=-1), b.amin(dim=-1))
    chi2 = 1.0 / b.amin(dim=-1)
    return 1.0 - lr * (2.0 * mu - lr * lipschitz**2) / chi2


def anchor(labels: Tensor | list, num_classes: int) -> Tensor:
    """A_k = N_k/N, the empirical label distribution: the fixed point of the empirical CE energy (paper eq. 22)."""
    y = check_labels(labels, num_classes).reshape(-1)
    if y.numel() == 0:
        raise ValueError("labels is empty; the anchor needs at least one label")
    return torch.bincount(y, minlength=num_classes).to(torch.float64) / y.numel()


def belief_step_cap(
    logits: Tensor,
    logit_slopes: Tensor,
    labels: Tensor | None = None,
    rule: str = "paper",
    backoff: bool = True,
    eps: float = 1e-10,
) -> Tensor:
    """τ_max,n = η_adm(p_n)·‖P_T g_n‖/‖J_s(p_n) a_n‖, the largest step τ with η_eff,n(τ) <= η_adm(p_n).

    First-order pull-back of MATH_BELIEF.md §8: a step τ moves logits by τ·a_n (a = ``logit_slopes``, dz/dτ) and the
    belief by Δp_n ≈ τ·J_s a_n with J_s = diag(p) − ppᵀ; the effective belief-space step is
    η_eff,n = ‖Δp_n‖/‖P_T g_n‖ with g_n = −y_n/p_n the CE gradient, and η_adm = ``max_step(p, rule)``, times
    ``1/(1 + α(B))`` when ``backoff`` is true. For a one-hot label c, ‖P_T g‖ = √((K−1)/K)/p_c.

    Without labels we take the predicted class argmax p_n as the label. This is the worst case over all one-hot
    labels (the smallest ‖P_T g‖, hence the smallest cap), so the cap stays valid whatever the true label is.
    The locally normalized proxy y = p cannot be used: its gradient −1 is normal to the simplex, P_T g = 0, and the
    cap would be 0 for every sample. Returns shape (...); inf where J_s a = 0 (the belief does not move), except
    that η_adm = 0 (only when an entry of p underflows to 0) gives 0, the conservative choice.
    """
    z = class_vectors(logits, "logits")
    a = class_vectors(logit_slopes, "logit_slopes")
    same_shape(z, a, "logits", "logit_slopes")
    k = z.shape[-1]
    p = _softmax(z)
    if labels is None:
        label_prob = p.amax(dim=-1)
    else:
        y = check_labels(labels, k)
        if y.shape != z.shape[:-1]:
            want = tuple(z.shape[:-1])
            raise ValueError(f"labels has shape {tuple(y.shape)} but logits needs {want} (one label per row)")
        label_prob = p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    eta_adm = ads_step(p, rule, eps) if backoff else _max_step(p, rule)
    tangent_grad_norm = math.sqrt((k - 1) / k) / label_prob
    centred = a - a.amax(dim=-1, keepdim=True)  # J_s ignores constant shifts; this makes J_s(c·1) exactly 0
    belief_speed = torch.linalg.vector_norm(p * (centred - (p * centred).sum(dim=-1, keepdim=True)), dim=-1)
    cap = torch.where(belief_speed > 0, eta_adm * tangent_grad_norm / belief_speed, math.inf)
    return torch.where(eta_adm > 0, cap, 0.0)
