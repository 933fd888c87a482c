"""DeepSpeed: SafeStep as the engine's client optimizer, for ZeRO stage 0 in fp32, where the engine steps it directly.

The engine averages the gradients over the ranks and calls the guard's ``step()`` once per optimizer step. ZeRO
stages 1–3, fp16 and bf16 step the optimizer on flat partitions or master copies instead of the model's
parameters, so they are refused (docs/integrations.md, "DeepSpeed").
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..guard import SafeStep

__all__ = ["safestep_initialize", "check_config"]

_PARTITIONED = ("ZeRO stage {stage} partitions the optimizer's parameters into flat fp32 shards and steps the wrapped "
                "optimizer on those, which are not the model's parameters: SafeStep cannot measure or probe that "
                "update. Use ZeRO stage 0 (DeepSpeed data parallelism), or FSDP2 (torch.distributed.fsdp.fully_shard, "
                "the HF Trainer's fsdp='full_shard', OLMo-core's FSDP) for sharded training with SafeStep")
_MASTER = ("DeepSpeed's {name} mode steps the wrapped optimizer on fp32 master copies of the parameters, not on the "
           "model's parameters: SafeStep cannot measure or probe that update. Train in fp32 (or autocast the forward "
           "yourself) with ZeRO stage 0, or use FSDP2 with a MixedPrecisionPolicy")


def check_config(config: Any) -> None:
    """ValueError naming the reason and the alternative when a DeepSpeed config (a dict or a JSON path) would make the
    engine step the optimizer on tensors other than the model's parameters; None when SafeStep can be the client."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as handle:
            config = json.load(handle)
    elif not isinstance(config, Mapping):
        config = {}
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, "0", None):  # "auto" (HF) too: the engine would pick a partitioning stage
        raise ValueError(_PARTITIONED.format(stage=stage))
    for name in ("fp16", "bf16"):
        if (config.get(name) or {}).get("enabled", False):
            raise ValueError(_MASTER.format(name=name))
    if config.get("optimizer"):
        raise ValueError("the DeepSpeed config builds its own optimizer ('optimizer' section), which SafeStep cannot "
                         "wrap: remove the section and pass the optimizer: safestep_initialize(model=model, "
                         "optimizer=torch.optim.AdamW(model.parameters(), ...), config=...)")


def safestep_initialize(*, model: nn.Module, optimizer: torch.optim.Optimizer, config: Any,
                        safestep: Mapping[str, Any] | None = None, **initialize_kwargs: Any) -> tuple:
    """``deepspeed.initialize(model=model, optimizer=SafeStep(optimizer, model, **safestep), config=config, ...)``.

    Returns ``(engine, guard, training_dataloader, lr_scheduler)``. Raises ValueError (``check_config``) for ZeRO
    stages 1–3, fp16, bf16 and a config ``optimizer`` section, and when the engine wrapped the guard anyway.
    """
    check_config(config)
    import deepspeed

    guard = SafeStep(optimizer, model, **dict(safestep or {}))
    engine, stepped, *rest = deepspeed.initialize(model=model, optimizer=guard, config=config, **initialize_kwargs)
    if stepped is not guard:
        raise ValueError(f"the DeepSpeed engine wrapped the guard in {type(stepped).__name__}, which steps it on "
                         "tensors other than the model's parameters; only ZeRO stage 0 in fp32 steps it directly")
    return (engine, guard, *rest)
