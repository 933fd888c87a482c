"""Convergence radius of the softmax cross-entropy along a step (Ghosts of Softmax, MATH_RADIUS.md §A2–A3).

F(t) = Σ_k w_k e^{a_k t} with w = softmax(logits), a = slopes; the line loss is analytic for |t| < ρ*,
the modulus of F's nearest complex zero. All functions take (..., K) tensors and work in float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import as_float64, class_vectors

__all__ = ["spread", "radius_lower_bound", "binary_radius"]


def spread(slopes: Tensor) -> Tensor:
    """Δ_a = max_k a_k − min_k a_k over the last dimension."""
    a = class_vectors(slopes, "slopes")
    return a.amax(dim=-1) - a.amin(dim=-1)


def radius_lower_bound(slopes: Tensor) -> Tensor:
    """ρ_a = π/Δ_a, a lower bound on ρ* for any K (inf where Δ_a = 0)."""
    d = spread(slopes)
    return torch.where(d > 0, math.pi / d, torch.full_like(d, math.inf))


def binary_radius(margin: Tensor | float, spread: Tensor | float) -> Tensor:
    """Exact K = 2 radius √(δ² + π²)/|Δ| (inf where Δ = 0)."""
    delta = as_float64(margin, "margin")
    d = as_float64(spread, "spread").abs()
    delta, d = torch.broadcast_tensors(delta, d)
    return torch.where(d > 0, torch.sqrt(delta**2 + math.pi**2) / d, torch.full_like(d, math.inf))
