"""Hessian curvature comparators for the "Hessian says 2/κ" diagnostic (docs/geometry.md, "Curvature comparators").

Lab code (moved out of ``safestep.geometry`` in issue 21): only the directions experiment compares ρ with 2/κ.

The loss is given functionally: ``loss_fn(params) -> scalar tensor``, where ``params`` is a list of tensors or a
dict name → tensor and ``loss_fn`` must compute the loss *from its argument* (not from tensors it closes over).
For an ``nn.Module`` use ``torch.func.functional_call``::

    params = {n: p for n, p in model.named_parameters()}
    loss_fn = lambda ps: F.cross_entropy(torch.func.functional_call(model, ps, (x,)), y)

Curvatures are computed with Hessian-vector products (double backward) on detached copies of ``params``, so the
model's parameters and their ``.grad`` are left untouched. Results are 0-dim float64 tensors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from safestep.norm import global_norm

from .checks import as_float64

__all__ = ["Params", "directional_curvature", "top_hessian_eigenvalue", "hessian_step"]

Params = Sequence[Tensor] | Mapping[str, Tensor]
LossFn = Callable[[Params], Tensor]


def _flatten(params: Params, name: str) -> tuple[list[Tensor], Callable[[list[Tensor]], Params]]:
    """Split ``params`` into a list of tensors and a function that rebuilds the original structure."""
    if isinstance(params, Mapping):
        keys = list(params)
        tensors = [params[k] for k in keys]
        rebuild: Callable[[list[Tensor]], Params] = lambda ts: dict(zip(keys, ts))
    elif isinstance(params, Sequence) and not isinstance(params, Tensor):
        tensors = list(params)
        rebuild = list
    else:
        raise ValueError(f"{name} must be a list of tensors or a dict name -> tensor, got {type(params).__name__}")
    if not tensors:
        raise ValueError(f"{name} is empty")
    if not all(isinstance(t, Tensor) and t.is_floating_point() for t in tensors):
        raise ValueError(f"{name} must contain only floating-point tensors")
    return tensors, rebuild


def _unit_direction(direction: Params, params: Params, reference: list[Tensor]) -> list[Tensor]:
    """Direction tensors matched to ``params`` (same structure and shapes), scaled to unit global L2 norm."""
    if isinstance(params, Mapping):
        if not isinstance(direction, Mapping) or set(direction) != set(params):
            raise ValueError("direction must be a dict with exactly the keys of params")
        tensors = [direction[k] for k in params]
    else:
        tensors, _ = _flatten(direction, "direction")
        if len(tensors) != len(reference):
            raise ValueError(f"direction has {len(tensors)} tensors but params has {len(reference)}")
    for d, p in zip(tensors, reference):
        if d.shape != p.shape:
            raise ValueError(f"direction tensor of shape {tuple(d.shape)} does not match parameter {tuple(p.shape)}")
    norm = float(global_norm([d.detach() for d in tensors]))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"direction must have a finite, non-zero norm, got {norm}")
    return [(d.detach() / norm).to(p) for d, p in zip(tensors, reference)]


class _HessianVectorProduct:
    """v ↦ Hv for a fixed loss and point: one differentiable backward pass, then one backward pass per product."""

    def __init__(self, loss_fn: LossFn, params: Params) -> None:
        tensors, rebuild = _flatten(params, "params")
        self.leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
        loss = loss_fn(rebuild(self.leaves))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        self.grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        if all(g is None or not g.requires_grad for g in self.grads):
            raise ValueError("loss_fn does not depend (twice differentiably) on params; did it close over other tensors?")

    def __call__(self, vector: list[Tensor]) -> list[Tensor]:
        """Hv as tensors shaped like the parameters (zeros where the gradient does not depend on a parameter)."""
        live = [(g, v) for g, v in zip(self.grads, vector) if g is not None and g.requires_grad]
        products = torch.autograd.grad(
            [g for g, _ in live], self.leaves, grad_outputs=[v for _, v in live], retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(products, self.leaves)]


def _dot(a: list[Tensor], b: list[Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def directional_curvature(loss_fn: LossFn, params: Params, direction: Params) -> Tensor:
    """κ = vᵀ∇²ℒ(θ)v, v = direction/‖direction‖ (global L2 norm over all tensors), via a Hessian-vector product."""
    hvp = _HessianVectorProduct(loss_fn, params)
    v = _unit_direction(direction, params, hvp.leaves)
    return torch.tensor(_dot(v, hvp(v)), dtype=torch.float64)


def _power_iteration(hvp: Callable[[list[Tensor]], list[Tensor]], start: list[Tensor], iters: int, tol: float) -> float:
    """Rayleigh quotient of the dominant (largest |λ|) eigenvector of the symmetric map ``hvp``."""
    v, estimate = start, math.nan
    for _ in range(iters):
        hv = hvp(v)
        previous, estimate = estimate, _dot(v, hv)
        norm = math.sqrt(_dot(hv, hv))
        if norm == 0.0:
            return 0.0
        v = [h / norm for h in hv]
        if abs(estimate - previous) <= tol * max(abs(estimate), 1e-30):
            break
    return estimate


def top_hessian_eigenvalue(
    loss_fn: LossFn, params: Params, iters: int = 50, tol: float = 1e-6, seed: int = 0
) -> Tensor:
    """λ_max(∇²ℒ(θ)), the largest *algebraic* eigenvalue (maximum curvature), by power iteration on HVPs.

    Power iteration from a seeded Gaussian start finds the largest-magnitude eigenvalue λ_m. If λ_m >= 0 it is
    λ_max; otherwise a second power iteration on H − λ_m·I (positive semidefinite) gives λ_max − λ_m. Each run stops
    when the Rayleigh quotient changes by <= tol (relative) or after ``iters`` products. Deterministic given ``seed``.
    Convergence is geometric in |λ_2/λ_1|: slow when the top two magnitudes are close (e.g. λ_max ≈ −λ_min).
    """
    if iters < 1 or not tol >= 0:
        raise ValueError(f"need iters >= 1 and tol >= 0, got iters={iters}, tol={tol}")
    hvp = _HessianVectorProduct(loss_fn, params)
    generator = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) for p in hvp.leaves]
    start_norm = math.sqrt(_dot(start, start))
    start = [s / start_norm for s in start]
    dominant = _power_iteration(hvp, start, iters, tol)
    if dominant >= 0:
        return torch.tensor(dominant, dtype=torch.float64)
    shifted = lambda v: [h - dominant * x for h, x in zip(hvp(v), v)]
    return torch.tensor(dominant + _power_iteration(shifted, start, iters, tol), dtype=torch.float64)


def hessian_step(kappa: Tensor | float) -> Tensor:
    """2/κ, the smoothness step of a quadratic model with curvature κ; inf for κ <= 0 (no curvature limit)."""
    k = as_float64(kappa, "kappa")
    return torch.where(k > 0, 2.0 / k, torch.full_like(k, math.inf))
