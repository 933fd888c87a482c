"""How a model is laid out: compiled, DDP/DataParallel wrappers, FSDP2 shards, FSDP1 refused (a leaf module: torch
only); what each layout means for the probe is docs/step.md, "Over ranks"."""
from __future__ import annotations

import functools

from torch import Tensor, nn

__all__ = ["probe_module", "capture_module", "is_sharded", "local_tensor", "fsdp2_modules"]


def capture_module(model: nn.Module) -> nn.Module:
    """The module whose calls are the training calls: inside DDP / DataParallel wrappers, the compiled module as is."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def probe_module(model: nn.Module) -> nn.Module:
    """The bare module the probe runs eagerly: inside DDP / DataParallel wrappers and ``torch.compile``."""
    model = capture_module(model)
    while isinstance(getattr(model, "_orig_mod", None), nn.Module) and type(model).__name__ == "OptimizedModule":
        model = capture_module(model._orig_mod)  # a torch.compile'd module keeps its original as _orig_mod
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
        raise ValueError("SafeStep does not support FSDP1 (FullyShardedDataParallel): its probe cannot perturb "
                         "flattened shards reliably; shard the model with FSDP2 (torch.distributed.fsdp.fully_shard) "
                         "instead")
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
