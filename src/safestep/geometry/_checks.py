"""Input validation shared by the geometry layer: every check raises ValueError naming the problem."""
from __future__ import annotations

import torch
from torch import Tensor


def as_float64(x: Tensor | float | list, name: str) -> Tensor:
    """Return ``x`` as a float64 tensor, raising ValueError if it is not numeric or not finite."""
    t = torch.as_tensor(x)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        raise ValueError(f"{name} must be a real numeric tensor, got dtype {t.dtype}")
    t = t.detach().to(torch.float64)
    if not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "inf"
        raise ValueError(f"{name} contains {bad} values; the geometry layer needs finite input")
    return t


def class_vectors(x: Tensor | list, name: str, min_classes: int = 2) -> Tensor:
    """Validate a (..., K) tensor of per-class values with K >= ``min_classes``; returns float64."""
    t = as_float64(x, name)
    if t.ndim == 0:
        raise ValueError(f"{name} must have a trailing class dimension of size K >= {min_classes}, got a scalar")
    if t.shape[-1] < min_classes:
        raise ValueError(f"{name} needs K >= {min_classes} classes in its last dimension, got shape {tuple(t.shape)}")
    return t


def same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ValueError unless ``a`` and ``b`` have identical shapes."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match")
