"""A step's arithmetic on the trainable parameters' local tensors: θ0 snapshots, Δθ and τ, the guarded write θ0 + s·Δθ,
restore; results stay on the device, only ``apply`` may read on the host (docs/step.md, "The cap is exact")."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .collectives import Reducer
from .norm import global_norm
from .probe import Displacement

__all__ = ["global_norm", "gradients_finite", "snapshot", "restore", "sharded_norm", "displacement", "apply",
           "rescale"]

_APPLY_ATTEMPTS = 16  # writes re-measured and shrunk at most this many times
_SHRINK = 1.0 - 2.0**-10  # each re-measured write aims this far inside the limit
_APRIORI_LOSS = 1e-3  # the rounding bound may shorten a step by at most this fraction; else the write is measured


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


def apply(live: Sequence[Tensor], step: Displacement, scale: float, limit: float, tau: float, theta_norm: float,
          reducer: Reducer | None = None, sharded: bool = False) -> float:
    """θ ← θ0 + s·Δθ with the realized ‖θ − θ0‖ <= ``limit`` exactly; returns the s used (0: restored to θ0).

    s is lowered until s·τ(1 + 3u) + u‖θ0‖ + √n·σ <= limit (u the largest unit roundoff, σ the smallest subnormal);
    if that shortens the step by more than 0.1 %, the written step is measured and shrunk until it fits (docs/step.md).
    """
    live = list(live)
    infos = [torch.finfo(t.dtype) for t in live]
    u, sigma = max(i.eps for i in infos) / 2, max(i.smallest_normal * i.eps for i in infos)
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


def _measured_write(live: list[Tensor], step: Displacement, scale: float, limit: float, reducer: Reducer | None,
                    sharded: bool) -> float:
    """The write measured: ‖θ − θ0‖ from float64 differences, one tensor at a time, and s shrunk until it fits."""
    for _ in range(_APPLY_ATTEMPTS):
        rescale(live, step, scale)
        norms = [global_norm([t.double() - t0.double()]) for t, t0 in zip(live, step.theta0)]
        realized = float(sharded_norm(norms, reducer, sharded))
        if realized <= limit:
            return scale
        scale *= limit / realized * _SHRINK
    restore(live, step.theta0)
    return 0.0
