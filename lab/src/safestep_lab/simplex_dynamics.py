"""Belief-space dynamics of the belief paper (Li & Li, arXiv 2605.06741; docs/geometry.md, docs/belief_support.md).

Lab code (moved out of ``safestep.geometry`` in issue 21): the library keeps the admissible-step *bounds*
(``max_step``, ``ads_step``, ``belief_radius``, ...); the maps they bound live here, where the belief-tracking
experiment and the tests run them. A belief p lies on the simplex Δ = {p_i >= 0, Σ p_i = 1}; the CE energy is
E(p) = −Σ y_k log p_k with gradient −y/p. All functions take (..., K) tensors and work in float64; invalid input
raises ValueError.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import belief_pair, class_labels, nonnegative, vectors

__all__ = ["GRADIENT_FLOOR", "project_to_simplex", "projected_step", "mirror_step", "contraction_factor", "anchor"]

GRADIENT_FLOOR = 1e-12  # p is floored at this value inside the CE gradient −y/p (docs/geometry.md)


def _softmax(z: Tensor) -> Tensor:
    """exp(z − max z)/Σ exp(z − max z) over the last dimension (entries of −inf give 0).

    Written out because torch.softmax parallelises even tiny inputs: on a loaded machine each call then costs
    milliseconds, which dominates loops of small belief updates.
    """
    e = (z - z.amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def project_to_simplex(v: Tensor) -> Tensor:
    """Π_Δ(v) = argmin_{q∈Δ} ‖q − v‖₂ over the last dimension (sort-based algorithm, Duchi et al. 2008)."""
    x = vectors(v, "v")
    u = torch.sort(x, dim=-1, descending=True).values
    cumulative = u.cumsum(dim=-1) - 1.0
    j = torch.arange(1, x.shape[-1] + 1, dtype=x.dtype)
    support = (u - cumulative / j > 0).sum(dim=-1, keepdim=True)  # the condition holds exactly on a prefix
    theta = cumulative.gather(-1, support - 1) / support
    return (x - theta).clamp(min=0.0)


def _step_inputs(p: Tensor, target: Tensor, eta: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    q, y = belief_pair(p, target, "p", "target")
    return q, y, nonnegative(eta, "eta").unsqueeze(-1)


def projected_step(p: Tensor, target: Tensor, eta: Tensor | float) -> Tensor:
    """F_η(p) = Π_Δ(p − η∇E(p)) with the CE gradient ∇E = −target/max(p, 1e-12): the paper's theory model.

    ``eta`` is a scalar or a (...) tensor broadcasting against the batch dimensions of ``p``. For
    η <= max_step(p, "support", target=y) it is Euclidean-nonexpansive near p (not contracting). It can land on a
    face of the simplex: with a soft target, at that threshold, on a class with y_k > 0, giving E = +∞
    (docs/belief_support.md §3); prefer ``mirror_step`` for soft targets.
    """
    q, y, lr = _step_inputs(p, target, eta)
    return project_to_simplex(q + lr * y / q.clamp(min=GRADIENT_FLOOR))


def mirror_step(p: Tensor, target: Tensor, eta: Tensor | float) -> Tensor:
    """Entropic mirror descent p' = softmax(log p + η·target/max(p, 1e-12)) (exponentiated gradient on CE).

    ``eta`` is a scalar or a (...) tensor broadcasting against the batch dimensions of ``p``; zero entries of p stay 0.
    Positive entries stay positive, so E stays finite for any target (in exact arithmetic). For a one-hot label c it
    raises p_c, hence lowers E = −log p_c, for every η > 0; for soft targets "E does not rise below the support
    rule" is measured, not proven (docs/belief_support.md §3).
    """
    q, y, lr = _step_inputs(p, target, eta)
    return _softmax(q.log() + lr * y / q.clamp(min=GRADIENT_FLOOR))


def contraction_factor(p1: Tensor, p2: Tensor, eta: Tensor | float) -> Tensor:
    """q(η) = 1 − η(2μ − ηL²)/C with μ = 1/max(p1 ∪ p2), L = 1/min(p1 ∪ p2), C = 1/min p2 (paper eq. 14).

    The proxy constants μ = 1/max p, L = 1/min p are taken at the worse of the two beliefs: max_i p_i is convex and
    min_i p_i concave, so these are the proxy constants valid on the whole segment [p1, p2], and they reduce to the
    paper's constants at p when p1 = p2 = p (where q < 1 iff η < max_step(p)). C = 1/min p2 is the χ² constant of
    KL(p1‖p2) <= C‖p1 − p2‖². The KL contraction KL(F p1‖F p2) <= q·KL(p1‖p2) is a local statement near the fixed
    point (docs/geometry.md); the rigorous global statement is Euclidean with factor √(1 − 2ημ + η²L²).
    Evaluated as 1 − 2ημ·m₂ + η²·m₂/m² (m = min(p1 ∪ p2), m₂ = min p2): a zero entry (L = ∞) gives +inf for η > 0
    (no contraction certified) and 1 for η = 0, never NaN.
    """
    a, b = belief_pair(p1, p2, "p1", "p2")
    lr = nonnegative(eta, "eta")
    mu = 1.0 / torch.maximum(a.amax(dim=-1), b.amax(dim=-1))
    least = torch.minimum(a.amin(dim=-1), b.amin(dim=-1))
    least_p2 = b.amin(dim=-1)
    tiny = torch.finfo(a.dtype).tiny
    lipschitz_sq_over_chi2 = torch.where(least > 0, least_p2 / least.clamp(min=tiny) ** 2, math.inf)
    quadratic = torch.where(lr > 0, lr**2 * lipschitz_sq_over_chi2, 0.0)
    return 1.0 - 2.0 * lr * mu * least_p2 + quadratic


def anchor(labels: Tensor | list, num_classes: int) -> Tensor:
    """A_k = N_k/N, the empirical label distribution: the fixed point of the empirical CE energy (paper eq. 22)."""
    y = class_labels(labels, num_classes).reshape(-1)
    return torch.bincount(y, minlength=num_classes).to(torch.float64) / y.numel()
