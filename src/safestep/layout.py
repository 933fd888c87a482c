"""How a model is laid out: compiled, DDP/DataParallel wrappers, FSDP2 shards (a leaf module: torch only).

* A ``DistributedDataParallel`` / ``DataParallel`` model is probed through its bare ``.module`` (the probe's
  forwards must not trigger gradient synchronization); a ``torch.compile``d model through its original module
  (``_orig_mod``: the same parameters, and forward-mode AD and parameter substitution need eager execution),
  while its training calls are captured on the compiled module the user calls.
* FSDP2 (``fully_shard``) parameters are DTensors: ``local_tensor`` gives this rank's shard, and the model is probed
  by ``ShardedProbe`` (central differences through its own forward, which all-gathers).
* FSDP1 ``FullyShardedDataParallel`` is refused: it keeps the root's parameters gathered after a forward and offers
  no public way to reshard, so perturbing its local shards in place would not reach the next forward.

Rank reductions live in ``safestep.collectives``; the reduction of a radius across ranks in ``safestep.step``;
the probe that fits a layout is ``safestep.probe.make_probe``.
"""
from __future__ import annotations

import functools

from torch import Tensor, nn

__all__ = ["probe_module", "capture_module", "is_sharded", "local_tensor", "fsdp2_modules"]


def _compiled(model: nn.Module) -> bool:
    """True for a ``torch.compile``d module (it keeps the original as ``_orig_mod``)."""
    return isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule"


def capture_module(model: nn.Module) -> nn.Module:
    """The module whose calls are the training calls: inside DDP / DataParallel wrappers, the compiled module as is."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def probe_module(model: nn.Module) -> nn.Module:
    """The bare module the probe runs eagerly: inside DDP / DataParallel wrappers and ``torch.compile``."""
    while True:
        model = capture_module(model)
        if not _compiled(model):
            return model
        model = model._orig_mod


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
