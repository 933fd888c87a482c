"""Count host reads (``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``.tolist()`` on a tensor: each waits for
the device on a GPU) by the module that asked for them, on any device (docs/step.md, "Costs")."""
from __future__ import annotations

import sys
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostReads", "READS"]

READS = (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
         torch.Tensor.__int__, torch.Tensor.__index__)


_TRANSPARENT = (__name__, "torch._tensor", "torch.overrides", "torch.utils._device")  # wrappers, not callers


def _caller_module() -> str:
    """The module name of the code that asked for the read (tensor-method wrappers are looked through)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "") in _TRANSPARENT:
        frame = frame.f_back
    return "" if frame is None else frame.f_globals.get("__name__", "")


class HostReads(TorchFunctionMode):
    """Counts host reads by calling module while active (``by_module``: module name -> reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_module: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in READS:
            self.by_module[_caller_module()] += 1
        return func(*args, **(kwargs or {}))

    def count(self, prefix: str = "") -> int:
        """Reads made by modules whose name starts with ``prefix`` (all reads for "")."""
        return sum(n for name, n in self.by_module.items() if name.startswith(prefix))
