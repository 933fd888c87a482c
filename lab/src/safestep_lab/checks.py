"""Input checks of the lab's own math (curvature comparators, belief dynamics) beyond the library's public
``safestep.geometry.checks``; each raises ValueError naming the problem."""
from __future__ import annotations

import torch
from torch import Tensor

from safestep.geometry.checks import as_float64, check_belief, same_shape

__all__ = ["as_float64", "belief_pair", "class_labels", "nonnegative", "vectors"]


def vectors(x: Tensor | list, name: str) -> Tensor:
    """A validated finite (..., K) float64 tensor with K >= 1."""
    t = as_float64(x, name)
    if t.ndim == 0:
        raise ValueError(f"{name} needs a last (class) dimension K >= 1, got a scalar")
    return t


def belief_pair(p: Tensor, q: Tensor, name_p: str, name_q: str) -> tuple[Tensor, Tensor]:
    """Two validated beliefs of the same shape."""
    a, b = check_belief(p, name_p), check_belief(q, name_q)
    same_shape(a, b, name_p, name_q)
    return a, b


def nonnegative(x: Tensor | float, name: str) -> Tensor:
    """A validated finite, non-negative float64 tensor."""
    t = as_float64(x, name)
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0, got min {t.min().item():.3g}")
    return t


def class_labels(labels: Tensor | list, num_classes: int, name: str = "labels") -> Tensor:
    """Validated non-empty integer class labels in [0, num_classes), as int64 of the same shape."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    t = torch.as_tensor(labels)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; at least one label is needed")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.min() < 0 or t.max() >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{t.min().item()}, {t.max().item()}]")
    return t
