"""How a model is laid out across processes: DDP/DataParallel wrappers, FSDP2 shards, and the probe that fits.

* A ``DistributedDataParallel`` / ``DataParallel`` model is probed through its bare ``.module`` (the probe's
  forwards must not trigger gradient synchronization).
* FSDP2 (``fully_shard``) parameters are DTensors: ``local_tensor`` gives this rank's shard, and the model is probed
  by ``ShardedProbe`` (central differences through its own forward, which all-gathers).
* FSDP1 ``FullyShardedDataParallel`` is refused: it keeps the root's parameters gathered after a forward and offers
  no public way to reshard, so perturbing its local shards in place would not reach the next forward.

Rank reductions live in ``safestep.collectives``; the reduction of a radius across ranks in ``safestep.step``.
"""
from __future__ import annotations

import functools

from torch import Tensor, nn

from .probe import LogitProbe, LogitsFn, Probe

__all__ = ["probe_module", "is_sharded", "local_tensor", "fsdp2_modules", "make_probe"]


def probe_module(model: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel / DataParallel wrapper (the model itself otherwise)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


@functools.cache
def _types(module: str, name: str) -> tuple[type, ...]:
    try:
        imported = __import__(module, fromlist=[name])
    except ImportError:
        return ()
    found = getattr(imported, name, None)
    return (found,) if isinstance(found, type) else ()


def is_sharded(model: nn.Module) -> bool:
    """True when the parameters are DTensors (FSDP2 ``fully_shard``); FSDP1 modules raise ValueError."""
    fsdp1 = _types("torch.distributed.fsdp", "FullyShardedDataParallel")
    if fsdp1 and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ValueError(
            "SafeStep does not support FSDP1 (FullyShardedDataParallel): its probe cannot perturb flattened "
            "shards reliably; shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) instead"
        )
    dtensor = _types("torch.distributed.tensor", "DTensor")
    return bool(dtensor) and any(isinstance(p, dtensor) for p in model.parameters())


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise); in-place writes reach the parameter."""
    dtensor = _types("torch.distributed.tensor", "DTensor")
    return t.to_local() if dtensor and isinstance(t, dtensor) else t


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 modules inside ``model`` (each must reshard after a probe forward)."""
    fsdp2 = _types("torch.distributed.fsdp", "FSDPModule")
    return [m for m in model.modules() if fsdp2 and isinstance(m, fsdp2)]


def make_probe(model: nn.Module, logits_fn: LogitsFn | None = None) -> Probe:
    """The probe for ``model`` as laid out: ShardedProbe for FSDP2 shards, LogitProbe for the bare dense module."""
    bare = probe_module(model)
    if is_sharded(bare):
        from .probe.sharded import ShardedProbe

        return ShardedProbe(bare, logits_fn)
    return LogitProbe(bare, logits_fn)
