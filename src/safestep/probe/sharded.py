"""Slopes of sharded (FSDP2 ``fully_shard``) parameters: a central difference through the module's own forward.

The forward all-gathers, so the probe sets this rank's local shards to θ0 + w·Δθ (w = ±h/τ, ``fd_step``) in place
and restores them (bit for bit) and every buffer afterwards; dropout is off and the RNG forked as in the dense
probe. Every rank must probe at the same time (the forward is a collective).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layout import fsdp2_modules, local_tensor
from .base import Displacement, Slopes, central_difference, fd_step
from .dense import LogitProbe, logits_of
from .inputs import Inputs, LogitsFn

__all__ = ["ShardedProbe"]


class ShardedProbe:
    """``along(params, step, inputs, method)`` for DTensor parameters; only finite differences ("auto" or "fd")."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        self.model = model
        self.logits_fn = logits_fn
        self._modes = LogitProbe(model, logits_fn)  # its mode switching and RNG fork are reused
        self._fsdp2 = fsdp2_modules(model)

    def uses_batch_statistics(self) -> bool:
        """True when a batch norm normalizes with batch statistics (the batch rows are then coupled)."""
        return self._modes.uses_batch_statistics()

    def along(self, params: Sequence[Tensor], step: Displacement, inputs: Inputs, method: str,
              reference: Tensor | None = None) -> Slopes:
        """(z(θ0 + hv) − z(θ0 − hv))/2h through the model; the local shards end as they began."""
        if method in ("jvp", "reuse"):
            raise ValueError(f"method={method!r} cannot probe sharded (FSDP) parameters; use method='auto' or 'fd'")
        shards = [local_tensor(p).detach() for p in params]
        saved = [t.clone() for t in shards]
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        h = fd_step(step.theta_norm, shards[0].dtype)
        weight = h * step.inverse_tau
        try:
            with self._modes.deterministic(), torch.no_grad():
                plus = self._logits_at(shards, step.theta0, saved, weight, inputs)
                minus = self._logits_at(shards, step.theta0, saved, -weight, inputs)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(shards, saved)
                for buffer, value in buffers:
                    buffer.copy_(value)
        return central_difference(plus, minus, h)

    def _logits_at(self, shards: list[Tensor], theta0: list[Tensor], theta1: list[Tensor], weight: Tensor,
                   inputs: Inputs) -> Tensor:
        torch._foreach_copy_(shards, torch._foreach_lerp(theta0, theta1, weight))
        logits = logits_of(self.model, inputs, self.logits_fn)
        for module in self._fsdp2:  # a root keeps its parameters gathered after forward: the next one would be stale
            module.reshard()
        return logits
