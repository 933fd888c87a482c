"""The package's one global L2 norm of a list of tensors (a leaf module: probes, the step and the lab share it)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["global_norm"]


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """‖(t_1, …, t_n)‖₂ over all tensors, accumulated in float64 (0-dim, on the first tensor's device)."""
    device = tensors[0].device
    norms = torch._foreach_norm(list(tensors), 2, dtype=torch.float64)
    if any(n.device != device for n in norms):
        norms = [n.to(device) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms))
