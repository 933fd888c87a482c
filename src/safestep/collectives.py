"""Rank reductions for rank-consistent SafeStep decisions under torch.distributed, gloo-compatible only (all_reduce
SUM or MIN, all_gather); the identity without a group or with one rank (docs/step.md, "Over ranks")."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Reducer", "make_reducer"]


class Reducer:
    """Collectives over one process group; with a world size of 1 (or no group) every call is the identity."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = 1 if group is None else dist.get_world_size(group)
        nccl = group is not None and dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    @property
    def active(self) -> bool:
        """True when there is more than one rank to agree with."""
        return self.world_size > 1

    def _all_reduce(self, values: Tensor, op_name: str) -> Tensor:
        if not self.active:
            return values
        reduced = values.to(self.device, copy=True)
        dist.all_reduce(reduced, op=getattr(dist.ReduceOp, op_name), group=self.group)
        return reduced.to(values.device)

    def min(self, values: Tensor) -> Tensor:
        """Elementwise min_r values_r over ranks (all_reduce MIN)."""
        return self._all_reduce(values, "MIN")

    def sum(self, values: Tensor) -> Tensor:
        """Elementwise Σ_r values_r over ranks (all_reduce SUM)."""
        return self._all_reduce(values, "SUM")

    def max(self, values: Tensor) -> Tensor:
        """Elementwise max_r values_r over ranks (a MIN of −values)."""
        return -self._all_reduce(-values, "MIN")

    def gather_rows(self, rows: Tensor) -> Tensor:
        """cat_r rows_r along dim 0 in rank order; ranks may hold different row counts (sizes gathered first)."""
        if not self.active:
            return rows
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
    if process_group is None:
        return Reducer(dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
    if dist.is_available() and process_group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("this rank is not a member of process_group (dist.new_group(ranks) excludes it); "
                         "create the SafeStep only on member ranks or pass a group that contains this rank")
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise ValueError("process_group must be a torch.distributed.ProcessGroup (e.g. dist.new_group(...)) or None "
                         f"for the default group, got {type(process_group).__name__}")
    return Reducer(process_group)
