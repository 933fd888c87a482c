"""One measured step as pure functions: the functional core under ``SafeStep`` (docs/step.md).

    snapshot(θ)  →  inner optimizer step  →  displacement(θ1, θ0) = (Δθ, τ)  →  probe_slopes  →  radius = ρ
                 →  scale_for(mode, r, τ, ρ) = s  →  apply(θ0 + s·Δθ, with ‖θ − θ0‖ ≤ r·ρ exactly)  |  restore(θ0)

Every function here works on lists of tensors (the trainable parameters' local tensors, in one fixed order) and
returns device tensors; only ``SafeStep`` reads numbers on the host (once per step, for the apply decision).
``global_norm`` is the package's one global L2 norm and ``probe.fd_step`` its one finite-difference step rule.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .bounds import IGNORE_INDEX, Bound, Min, aggregate_radii, leaves
from .collectives import Reducer
from .probe import Displacement, Inputs, Probe, Slopes

__all__ = [
    "MODES",
    "Displacement",
    "Radius",
    "global_norm",
    "gradients_finite",
    "snapshot",
    "restore",
    "sharded_norm",
    "displacement",
    "probe_slopes",
    "radius",
    "Decision",
    "read_decision",
    "scale_for",
    "apply",
    "rescale",
    "unit_roundoff",
]

MODES = ("cap", "set", "monitor")
_APPLY_ATTEMPTS = 16  # writes re-measured and shrunk at most this many times
_SHRINK = 1.0 - 2.0**-10  # each re-measured write aims this far inside the limit
_APRIORI_LOSS = 1e-3  # the rounding bound may shorten a step by at most this fraction; else the write is measured


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖(t_1, …, t_n)‖₂ over all tensors, accumulated in float64 (0-dim, on the first tensor's device)."""
    device = tensors[0].device
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float64)
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))


def gradients_finite(grads: Sequence[Tensor]) -> Tensor:
    """True (0-dim bool) when every gradient entry is finite; sparse gradients are checked on their values."""
    dense = [g for g in grads if not g.is_sparse]
    values = [g.coalesce().values() for g in grads if g.is_sparse]
    parts = [t for t in (dense + values) if t.numel()]
    if not parts:
        return torch.tensor(True)
    return torch.isfinite(global_norm(parts))


def snapshot(live: Sequence[Tensor]) -> list[Tensor]:
    """θ0: a copy of every tensor (the one parameter-sized buffer a step keeps)."""
    return [t.clone() for t in live]


def restore(live: Sequence[Tensor], theta0: Sequence[Tensor]) -> None:
    """θ ← θ0, bit for bit."""
    torch._foreach_copy_(list(live), list(theta0))


def sharded_norm(tensors: Sequence[Tensor], reducer: Reducer | None, sharded: bool) -> Tensor:
    """The global norm; for shards, √(Σ_r ‖·_r‖²) over the ranks (one all_reduce SUM)."""
    norm = global_norm(tensors)
    return reducer.sum(norm**2).sqrt() if sharded and reducer is not None else norm


def displacement(live: Sequence[Tensor], theta0: list[Tensor], reducer: Reducer | None = None,
                 sharded: bool = False) -> Displacement:
    """Δθ = θ1 − θ0, τ = ‖Δθ‖ and ‖θ0‖ (computed when first read)."""
    delta = torch._foreach_sub(list(live), theta0)
    return Displacement(theta0, delta, sharded_norm(delta, reducer, sharded),
                        lambda: sharded_norm(theta0, reducer, sharded))


def probe_slopes(probe: Probe, params: Sequence[Tensor], step: Displacement, inputs: Inputs, method: str) -> Slopes:
    """a = J_z(θ0)·Δθ/τ on ``inputs`` (under no_grad)."""
    with torch.no_grad():
        return probe.along(params, step, inputs, method)


@dataclass(frozen=True)
class Radius:
    """ρ over the probed rows of every rank, with what the apply decision reads (device tensors, except binding).

    ``flags`` (float64, 3): 1 where some active row of some rank has a NaN or infinite logit, where a label is
    neither a class index nor IGNORE_INDEX, where a −inf (masked) logit was seen. ``binding``: index of the leaf
    bound that set ρ (a tensor when there are several). ``tau_range``: (min, max) of τ over ranks, None alone.
    """

    rho: Tensor
    flags: Tensor
    binding: Tensor | int
    tau_range: Tensor | None


def _row_checks(slopes: Slopes, labels: Tensor | None) -> Tensor:
    """(a non-ignored row has a NaN or +inf logit, a label is invalid, a −inf logit exists) as 0/1 float64 flags,
    from one min and one max reduction of the logits."""
    logits = slopes.logits
    low, high = logits.amin(dim=-1), logits.amax(dim=-1)  # two passes: aminmax is ~5x slower on CPU
    broken = torch.isnan(low) | (high == math.inf) | (high == -math.inf)
    masked = torch.isneginf(low).any()
    if labels is None:
        return torch.stack([broken.any(), torch.zeros_like(masked), masked]).to(torch.float64)
    ignored = labels == IGNORE_INDEX
    invalid = ((labels < 0) | (labels >= logits.shape[-1])) & ~ignored
    return torch.stack([(broken & ~ignored).any(), invalid.any(), masked]).to(torch.float64)


def _check_label_shape(slopes: Slopes, labels: Tensor | None) -> None:
    if labels is not None and tuple(labels.shape) != tuple(slopes.logits.shape[:-1]):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the probed logits have rows "
                         f"{tuple(slopes.logits.shape[:-1])}: give one class index per logits row (IGNORE_INDEX -100 "
                         "for rows outside the loss)")


def radius(bound: Bound | Min, slopes: Slopes, labels: Tensor | None, tau: Tensor, *, masked: bool,
           reducer: Reducer) -> Radius:
    """ρ = min over the bound's leaves of each leaf's radius, every leaf reduced over ranks on its own.

    "max" leaves: the per-rank radius, then MIN over ranks; quantile leaves: the per-row radii of every rank are
    gathered and the quantile is taken over the global batch. One all_reduce MIN carries the flags, ±τ and the
    "max" radii. Bounds that validate their input (``accepts_nonfinite`` false: exact, belief) are evaluated only
    when every row is finite, which costs one host read; the ghost bound needs none.
    """
    _check_label_shape(slopes, labels)
    flags = _row_checks(slopes, labels)
    members = list(leaves(bound))
    usable = all(getattr(m, "accepts_nonfinite", False) for m in members) or not bool(flags[:2].any())
    quantile = [getattr(m, "aggregate", "max") != "max" for m in members]
    local = [_local_radius(m, slopes, labels, masked, usable, tau.device) for m, q in zip(members, quantile) if not q]
    tau_range = None
    maxed = iter(local)
    if reducer.active:
        carried = reducer.min(torch.cat([-flags, torch.stack([tau, -tau]),
                                         *[torch.nan_to_num(r, nan=math.inf).reshape(1) for r in local]]))
        flags, tau_range, maxed = -carried[:3], torch.stack([carried[3], -carried[4]]), iter(list(carried[5:]))
    radii = [_global_quantile(m, slopes, labels, masked, reducer, usable) if q else next(maxed)
             for m, q in zip(members, quantile)]
    if len(radii) == 1:
        return Radius(radii[0], flags, 0, tau_range)
    stacked = torch.stack(radii)
    return Radius(stacked.amin(), flags, stacked.argmin(), tau_range)


def _local_radius(member: Bound, slopes: Slopes, labels: Tensor | None, masked: bool, usable: bool,
                  device: torch.device) -> Tensor:
    if not usable:
        return torch.tensor(math.nan, dtype=torch.float64, device=device)
    rho = member(slopes.logits, slopes.slopes, labels, masked=masked)
    return rho if rho.dtype == torch.float64 and rho.device == device else rho.to(device=device, dtype=torch.float64)


def _global_quantile(member: Bound, slopes: Slopes, labels: Tensor | None, masked: bool, reducer: Reducer,
                     usable: bool) -> Tensor:
    """The member's quantile over the rows of every rank (a rank whose rows are unusable contributes none)."""
    if usable:
        rows = member.row_radii(slopes.logits, slopes.slopes, labels, masked=masked).reshape(-1).to(torch.float64)
        active = torch.ones_like(rows) if labels is None else (labels.reshape(-1) != IGNORE_INDEX).to(rows.device, torch.float64)
        table = torch.stack([rows, active], dim=1)
    else:
        table = torch.zeros((0, 2), dtype=torch.float64, device=slopes.logits.device)
    gathered = reducer.gather_rows(table)
    if gathered.shape[0] == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=table.device)
    return aggregate_radii(gathered[:, 0], member.aggregate, gathered[:, 1] > 0)


@dataclass(frozen=True)
class Decision:
    """What the apply decision needs, read from the device in one go (``read_decision``)."""

    tau: float
    rho: float
    theta_norm: float
    broken: bool  # a NaN or infinite logit on an active row
    bad_labels: bool  # a label neither a class index nor IGNORE_INDEX
    masked: bool  # a −inf logit was seen
    gradients_ok: bool  # false when an optimizer that skips on the device skipped this update
    binding: int  # index of the leaf bound that set ρ
    tau_low: float
    tau_high: float


def read_decision(step: Displacement, found: Radius, finite_gradients: Tensor | None = None) -> Decision:
    """The step's one host read: τ, ρ, ‖θ0‖, the flags, the binding leaf and τ's range over ranks."""
    grads_ok = torch.ones(1, dtype=torch.float64) if finite_gradients is None else finite_gradients
    read = [torch.stack([step.tau, found.rho, step.theta_norm]), found.flags, grads_ok.to(found.flags.device)]
    if isinstance(found.binding, Tensor):
        read.append(found.binding.reshape(1).to(torch.float64))
    if found.tau_range is not None:
        read.append(found.tau_range)
    values = torch.cat(read).tolist()
    tau, rho, theta_norm, broken, bad_labels, masked, gradients_ok = values[:7]
    binding = int(values[7]) if isinstance(found.binding, Tensor) else 0
    tau_low, tau_high = values[-2:] if found.tau_range is not None else (tau, tau)
    return Decision(tau, rho, theta_norm, broken > 0, bad_labels > 0, masked > 0, gradients_ok > 0, binding,
                    tau_low, tau_high)


def scale_for(mode: str, r: float, tau: float, rho: float) -> tuple[float, str]:
    """s: 1 (monitor; or an infinite radius), min(1, r·ρ/τ) (cap) or r·ρ/τ (set); with the reason for the report."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "monitor":
        return 1.0, ""
    if math.isinf(rho):
        return 1.0, "infinite radius: inner update applied unscaled"
    target = r * rho / tau
    if mode == "cap":
        return (1.0, "") if target >= 1.0 else (target, "capped")
    return target, ""


def unit_roundoff(tensors: Sequence[Tensor]) -> tuple[float, float]:
    """(u, σ): the largest unit roundoff ε/2 and smallest subnormal among the tensors' dtypes."""
    infos = [torch.finfo(t.dtype) for t in tensors]
    return max(i.eps for i in infos) / 2, max(i.smallest_normal * i.eps for i in infos)


def apply(live: Sequence[Tensor], step: Displacement, scale: float, limit: float, tau: float, theta_norm: float,
          reducer: Reducer | None = None, sharded: bool = False) -> float:
    """θ ← θ0 + s·Δθ with the realized ‖θ − θ0‖ <= ``limit`` exactly; returns the s used (0: restored to θ0).

    s = 1 leaves θ1 untouched (bit for bit) when τ(1 + 2u) <= limit. Otherwise θ = fl(θ0 + fl(s·Δθ)) obeys
    ‖θ − θ0‖ <= s·τ(1 + 3u) + u‖θ0‖ + √n·σ elementwise-rounding bound (u the unit roundoff, σ the smallest
    subnormal), so s is lowered until that bound is <= limit — no host read. When that would shorten the step by
    more than 0.1 % (half precision, u = 2⁻⁸; or a step near the resolution of θ), the written step is measured
    exactly instead (one host read per attempt) and shrunk until it fits; if it never fits, θ0 is restored.
    """
    live = list(live)
    u, sigma = unit_roundoff(live)
    if scale == 1.0 and tau * (1.0 + 2.0 * u) <= limit:
        return 1.0
    n = sum(t.numel() for t in live)
    room = limit * (1.0 - 1e-12) - u * theta_norm - math.sqrt(n) * sigma
    safe = min(scale, room / (tau * (1.0 + 3.0 * u))) if room > 0 else 0.0
    if safe >= scale * (1.0 - _APRIORI_LOSS):
        rescale(live, step, safe)
        return safe
    return _measured_write(live, step, min(scale, limit / tau), limit, reducer, sharded)


def rescale(live: Sequence[Tensor], step: Displacement, scale: float) -> None:
    """θ ← θ0 + s·Δθ, as written (no bound on its rounding: ``apply`` is the guarded write)."""
    live = list(live)
    torch._foreach_copy_(live, step.theta0)
    torch._foreach_add_(live, step.delta, alpha=scale)


def _realized(live: list[Tensor], theta0: list[Tensor], reducer: Reducer | None, sharded: bool) -> float:
    """‖θ − θ0‖ computed exactly enough (differences in float64, one tensor at a time)."""
    squares = sum(torch.linalg.vector_norm(t.double() - t0.double()) ** 2 for t, t0 in zip(live, theta0))
    total = torch.as_tensor(squares, dtype=torch.float64)
    if sharded and reducer is not None:
        total = reducer.sum(total)
    return float(total.sqrt())


def _measured_write(live: list[Tensor], step: Displacement, scale: float, limit: float, reducer: Reducer | None,
                    sharded: bool) -> float:
    for _ in range(_APPLY_ATTEMPTS):
        rescale(live, step, scale)
        realized = _realized(live, step.theta0, reducer, sharded)
        if realized <= limit:
            return scale
        scale *= limit / realized * _SHRINK
    restore(live, step.theta0)
    return 0.0
