"""The probe that fits a model's layout: ``ShardedProbe`` for FSDP2 shards, ``LogitProbe`` for a dense module."""
from __future__ import annotations

from torch import nn

from ..layout import is_sharded, probe_module
from .base import Probe
from .dense import LogitProbe
from .inputs import LogitsFn
from .sharded import ShardedProbe

__all__ = ["make_probe"]


def make_probe(model: nn.Module, logits_fn: LogitsFn | None = None) -> Probe:
    """The probe for ``model`` as laid out (inside DDP/DataParallel wrappers and ``torch.compile``)."""
    bare = probe_module(model)
    return ShardedProbe(bare, logits_fn) if is_sharded(bare) else LogitProbe(bare, logits_fn)
