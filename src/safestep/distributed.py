"""Rank-consistent SafeStep decisions under torch.distributed (DDP, FSDP2) — ECOSYSTEM.md §4.

Every rank probes its own shard of the batch; the decisions are then reduced so that every rank applies the
same scale s and skips the same steps:

* skip: "any rank saw a non-finite gradient / probe output" is a MAX (here a MIN of −flag) over ranks;
* radius, "max" aggregation: ρ = min_r ρ_r (for Ghost this is π/max_r Δ_r, the spreads reduced with MAX;
  for Exact the per-rank min ρ*, for Belief the per-rank min cap), an all_reduce MIN;
* radius, quantile q: the per-row radii of all ranks are all_gathered (ranks may hold different row counts:
  sizes are gathered first, rows padded) and the quantile is taken over the global batch;
* τ = ‖Δθ‖: replicated parameters (DDP) give the same τ on every rank (checked: a spread across ranks raises);
  sharded parameters (FSDP) give τ² = Σ_r ‖Δθ_r‖², an all_reduce SUM.

Only gloo-compatible ops are used (SUM, MIN, all_gather). Sharded (FSDP2 DTensor) parameters are probed by a
central finite difference through the module's own forward (which all-gathers), perturbing the local shards in
place; FSDP1 ``FullyShardedDataParallel`` is refused with a ValueError (see ``is_sharded``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .bounds import Aggregate, Bound, Min, aggregate_radii
from .probe import LogitProbe, LogitsFn, Inputs, Slopes, default_logits_fn

__all__ = [
    "Reducer",
    "RankAgreement",
    "make_reducer",
    "probe_module",
    "is_sharded",
    "local_tensor",
    "check_reducible",
    "agree",
    "ShardedProbe",
]

TAU_RTOL = 1e-6


class Reducer:
    """Collectives over one process group; with a world size of 1 (or no group) every call is the identity."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.device = torch.device("cpu")
        if group is None:
            self.world_size, self.rank = 1, 0
        else:
            import torch.distributed as dist

            self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
            if dist.get_backend(group) == "nccl":
                self.device = torch.device("cuda", torch.cuda.current_device())

    @property
    def active(self) -> bool:
        """True when there is more than one rank to agree with."""
        return self.world_size > 1

    def _all_reduce(self, values: Tensor, op_name: str) -> Tensor:
        if not self.active:
            return values
        import torch.distributed as dist

        reduced = values.to(self.device, copy=True)
        dist.all_reduce(reduced, op=getattr(dist.ReduceOp, op_name), group=self.group)
        return reduced.to(values.device)

    def min(self, values: Tensor) -> Tensor:
        """Elementwise min_r values_r over ranks (all_reduce MIN)."""
        return self._all_reduce(values, "MIN")

    def sum(self, values: Tensor) -> Tensor:
        """Elementwise Σ_r values_r over ranks (all_reduce SUM)."""
        return self._all_reduce(values, "SUM")

    def any(self, flag: bool) -> bool:
        """∨_r flag_r: true on every rank when it is true on any rank (all_reduce MIN of −flag)."""
        return bool(self.min(torch.tensor([-float(flag)], dtype=torch.float64)).item() < 0)

    def gather_rows(self, rows: Tensor) -> Tensor:
        """cat_r rows_r along dim 0 in rank order; ranks may hold different row counts (sizes gathered first)."""
        if not self.active:
            return rows
        import torch.distributed as dist

        size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        counts = [int(s.item()) for s in sizes]
        padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=self.device)
        padded[: rows.shape[0]] = rows
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(rows.device)


def make_reducer(process_group: Any = None) -> Reducer:
    """The Reducer of ``process_group``, or of the default group when torch.distributed is initialized, else a no-op."""
    import torch.distributed as dist

    if process_group is None:
        if dist.is_available() and dist.is_initialized():
            return Reducer(dist.group.WORLD)
        return Reducer()
    if dist.is_available() and process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("this rank is not a member of process_group (dist.new_group(ranks) excludes it); "
                         "create the SafeStep only on member ranks or pass a group that contains this rank")
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise ValueError(
            f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.new_group(...)) or None for the "
            f"default group, got {type(process_group).__name__}"
        )
    return Reducer(process_group)


def probe_module(model: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel / DataParallel wrapper (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _fsdp1_types() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return ()
    return (FullyShardedDataParallel,)


def _fsdp2_types() -> tuple[type, ...]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return ()
    return (FSDPModule,)


def _dtensor_types() -> tuple[type, ...]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return (DTensor,)


def is_sharded(model: nn.Module) -> bool:
    """True when the parameters are DTensors (FSDP2 ``fully_shard``); FSDP1 modules raise ValueError.

    FSDP1 (``FullyShardedDataParallel``) keeps the root's parameters gathered after a forward and offers no
    public way to reshard, so perturbing its local shards in place would not reach the next forward.
    """
    if any(isinstance(m, _fsdp1_types()) for m in model.modules()):
        raise ValueError(
            "SafeStep does not support FSDP1 (FullyShardedDataParallel): its probe cannot perturb flattened "
            "shards reliably; shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
        )
    return any(isinstance(p, _dtensor_types()) for p in model.parameters())


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise); in-place writes reach the parameter."""
    return t.to_local() if isinstance(t, _dtensor_types()) else t


def _leaves(bound: Bound) -> Iterator[Bound]:
    if isinstance(bound, Min):
        for member in bound.bounds:
            yield from _leaves(member)
    else:
        yield bound


def _aggregate(bound: Bound) -> Aggregate:
    return getattr(bound, "aggregate", "max")


def check_reducible(bound: Bound) -> None:
    """Raise ValueError if a quantile-aggregated bound cannot give the per-row radii a global quantile needs."""
    for leaf in _leaves(bound):
        if _aggregate(leaf) != "max" and not callable(getattr(leaf, "row_radii", None)):
            raise ValueError(
                f"bound {leaf.name!r} aggregates with quantile {_aggregate(leaf)!r} but has no row_radii(logits, "
                "slopes, labels) method; across ranks a quantile needs every row's radius (use aggregate='max')"
            )


@dataclass(frozen=True)
class RankAgreement:
    """The reduced step decision: global ρ, whether every rank's probe was finite, and τ's range over ranks."""

    rho: float
    probe_ok: bool
    tau_min: float
    tau_max: float

    def tau_agrees(self) -> bool:
        """True when |τ_max − τ_min| <= TAU_RTOL·τ_max (replicated parameters give one τ)."""
        return self.tau_max - self.tau_min <= TAU_RTOL * self.tau_max


def agree(bound: Bound, reducer: Reducer, slopes: Slopes | None, labels: Tensor | None, tau: float) -> RankAgreement:
    """ρ over the global batch: "max" members by MIN of per-rank ρ_r, quantile members on gathered row radii.

    ``slopes`` is None on a rank whose probe failed (non-finite); that rank contributes no radius and makes
    every rank skip. ``Min`` bounds reduce each member on its own and take the smallest.
    """
    leaves = list(_leaves(bound))
    maxed = [leaf for leaf in leaves if _aggregate(leaf) == "max"]
    quantiles = [leaf for leaf in leaves if _aggregate(leaf) != "max"]
    local = [float(leaf(slopes.logits, slopes.slopes, labels)) if slopes is not None else math.inf for leaf in maxed]
    reduced = reducer.min(torch.tensor([-float(slopes is None), tau, -tau, *local], dtype=torch.float64))
    probe_ok = reduced[0].item() == 0.0
    radii = reduced[3:].tolist()
    if probe_ok and quantiles:
        rows = torch.stack([leaf.row_radii(slopes.logits, slopes.slopes, labels).reshape(-1).double().cpu()
                            for leaf in quantiles], dim=1)
        gathered = reducer.gather_rows(rows)
        radii += [float(aggregate_radii(gathered[:, j], _aggregate(leaf))) for j, leaf in enumerate(quantiles)]
    rho = min(radii) if probe_ok else math.nan
    return RankAgreement(rho, probe_ok, reduced[1].item(), -reduced[2].item())


class ShardedProbe:
    """Slopes of sharded (FSDP2) parameters: a ≈ (z(θ0 + hv) − z(θ0 − hv))/2h through the module's own forward.

    The local shards are written in place under no_grad and restored (bit for bit) afterwards; buffers
    (batch-norm running statistics) are restored too, dropout is off and the RNG is forked, as in LogitProbe.
    Every rank must call it at the same time (the forward all-gathers).
    """

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        self.model = model
        self.logits_fn = logits_fn or default_logits_fn
        self._modes = LogitProbe(model, logits_fn)  # its dropout/RNG handling is reused
        self._fsdp2 = [m for m in model.modules() if isinstance(m, _fsdp2_types())]

    def uses_batch_statistics(self) -> bool:
        """True when a batch norm normalizes with batch statistics (the batch rows are then coupled)."""
        return self._modes.uses_batch_statistics()

    def __call__(self, shards: Sequence[Tensor], theta0: Sequence[Tensor], direction: Sequence[Tensor],
                 inputs: Inputs, h: float) -> Slopes:
        """Central difference of the logits along ``direction`` with step ``h``; ``shards`` end as they began."""
        saved = [t.clone() for t in shards]
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        try:
            with self._modes.deterministic(), torch.no_grad():
                plus = self._logits_at(shards, theta0, direction, h, inputs)
                minus = self._logits_at(shards, theta0, direction, -h, inputs)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(list(shards), saved)
                for buffer, value in buffers:
                    buffer.copy_(value)
        return Slopes((plus + minus) / 2, (plus - minus) / (2 * h), "fd")

    def _logits_at(self, shards: Sequence[Tensor], theta0: Sequence[Tensor], direction: Sequence[Tensor],
                   h: float, inputs: Inputs) -> Tensor:
        torch._foreach_copy_(list(shards), list(theta0))
        torch._foreach_add_(list(shards), list(direction), alpha=h)
        logits = self.logits_fn(self.model, inputs)
        for module in self._fsdp2:  # a root keeps its parameters gathered after forward: the next one would be stale
            module.reshard()
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.ndim < 2:
            raise ValueError("logits_fn must return a floating tensor of shape (B, K) or (B, T, V)")
        return logits
