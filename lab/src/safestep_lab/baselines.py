"""Comparison methods for the lab: adaptive gradient clipping and the paper code's gradient-direction controller.

* ``adaptive_grad_clip_`` — AGC (Brock et al. 2021, NFNets): each unit's gradient G_i is rescaled so that
  ‖G_i‖ ≤ λ·max(‖W_i‖, ε). A unit is one output row (dim 0) of a tensor with ≥ 2 dims, and the whole tensor
  for scalars and vectors (biases, norm gains).
* ``GradientDirectionController`` — the controller the paper's released archgrid code used:
  ρ_g is measured along v = −g/‖g‖ (the raw gradient, not the optimizer's step), the step length is taken as
  the SGD proxy τ = lr·‖g‖, and the inner optimizer runs with lr_eff = min(lr, r·ρ_g/‖g‖). For Adam this is not
  the length of the step actually taken; safestep's ``SafeStep`` measures the actual step instead.
"""
from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from torch import Tensor, nn

from safestep.bounds import BoundSpec, make_bound
from safestep.probe import LogitProbe, choose_rows, probe_count
from safestep.norm import global_norm
from safestep.telemetry import StepReport

__all__ = ["AGC_CLIP_FACTOR", "AGC_EPS", "unitwise_norm", "adaptive_grad_clip_", "GradientDirectionController"]

AGC_CLIP_FACTOR = 0.01
AGC_EPS = 1e-3
_TINY_GRAD = 1e-6  # floor on ‖G_i‖ in the rescale factor (only matters when the unit is clipped anyway)


def unitwise_norm(t: Tensor) -> Tensor:
    """‖t_i‖₂ per output unit i (rows along dim 0, broadcastable to t); the whole-tensor norm for ndim ≤ 1."""
    if t.ndim <= 1:
        return torch.linalg.vector_norm(t)
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), keepdim=True)


@torch.no_grad()
def adaptive_grad_clip_(parameters: Iterable[Tensor], clip_factor: float = AGC_CLIP_FACTOR, eps: float = AGC_EPS) -> None:
    """In place: G_i ← G_i · min(1, λ·max(‖W_i‖, ε)/‖G_i‖) for every unit i of every parameter with a gradient."""
    if not (math.isfinite(clip_factor) and clip_factor > 0):
        raise ValueError(f"clip_factor must be a finite positive number, got {clip_factor}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite positive number, got {eps}")
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = unitwise_norm(p.detach()).clamp_min(eps) * clip_factor
        grad_norm = unitwise_norm(p.grad)
        factor = max_norm / grad_norm.clamp_min(_TINY_GRAD)
        p.grad.mul_(torch.where(grad_norm > max_norm, factor, torch.ones_like(factor)))


class GradientDirectionController:
    """lr_eff = min(lr, r·ρ_g/‖g‖) with ρ_g the bound along −g/‖g‖ at θ0 (the reference archgrid controller).

    ``step(optimizer, inputs)`` runs ``optimizer.step()`` once with every group's LR scaled by
    s = min(1, r·ρ_g/(lr·‖g‖)) and restores the LRs afterwards. The optimizer's state advances with the raw
    gradient, as in the reference. ρ_g is measured on ``inputs`` (``probe_size`` rows of it, chosen as SafeStep
    chooses them; None = all, the reference's choice) in the model's current mode: for train-mode BatchNorm that
    is the batch-statistics function being trained (the reference measured the eval-mode network instead).
    """

    def __init__(self, model: nn.Module, r: float = 1.0, bound: BoundSpec = "ghost", method: str = "auto",
                 probe_size: int | None = None) -> None:
        if not (math.isfinite(r) and r > 0):
            raise ValueError(f"r must be a finite positive number, got {r}")
        self.r = r
        self.method = method
        self.probe_size = probe_size
        self.bound = make_bound(bound)
        self.probe = LogitProbe(model)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}

    def step(self, optimizer: torch.optim.Optimizer, inputs: Tensor) -> StepReport:
        """One controlled step; its report has τ = lr·‖g‖ (the SGD proxy), ρ_g, r = τ/ρ_g and s (plain if ‖g‖ ≈ 0)."""
        start = time.perf_counter()
        grads = {name: p.grad for name, p in self.params.items() if p.grad is not None}
        lrs = [group["lr"] for group in optimizer.param_groups]
        if len(set(lrs)) != 1:
            raise ValueError(f"the gradient-direction controller needs one LR for all param groups, got {lrs}")
        grad_norm = float(global_norm(list(grads.values())))
        tau = lrs[0] * grad_norm
        if not grad_norm > 1e-12 or not math.isfinite(grad_norm):
            optimizer.step()
            return self._report(start, tau, math.nan, 1.0, "none", 0, "gradient too small or not finite: plain step")
        rho, method, rows = self.radius(grads, grad_norm, inputs)
        scale = min(1.0, self.r * rho / tau)
        try:
            for group in optimizer.param_groups:
                group["lr"] = lrs[0] * scale
            optimizer.step()
        finally:
            for group in optimizer.param_groups:
                group["lr"] = lrs[0]
        return self._report(start, tau, rho, scale, method, rows, "capped" if scale < 1.0 else "")

    def _report(self, start: float, tau: float, rho: float, scale: float, method: str, rows: int,
                reason: str) -> StepReport:
        ratio = tau / rho if rho > 0 else math.inf
        return StepReport(tau=tau, rho=rho, r_proposed=ratio, scale=scale, r_applied=scale * ratio,
                          bound=self.bound.name, method=method, rows_probed=rows, skipped=False,
                          seconds=time.perf_counter() - start, reason=reason)

    @torch.no_grad()
    def radius(self, grads: dict[str, Tensor], grad_norm: float, inputs: Tensor) -> tuple[float, str, int]:
        """(ρ_g, method, rows probed): bound(logits, J_z·v) at the current θ along v = −g/‖g‖."""
        batch = len(inputs)
        rows = None if self.probe.uses_batch_statistics() else choose_rows(batch, probe_count(batch, self.probe_size), None, 0)
        probed = inputs if rows is None else inputs.index_select(0, rows)
        params = {name: self.params[name].detach() for name in grads}
        direction = {name: -g / grad_norm for name, g in grads.items()}
        slopes = self.probe(params, direction, probed, self.method)
        return float(self.bound(slopes.logits, slopes.slopes)), slopes.method, len(probed)
