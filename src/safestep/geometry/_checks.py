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


def check_belief(x: Tensor | list, name: str = "p", atol: float = 1e-6) -> Tensor:
    """Validate a (..., K) belief on the closed simplex: finite, K >= 2, entries >= 0, |Σ_k p_k − 1| <= atol."""
    t = class_vectors(x, name)
    if (t < 0).any():
        raise ValueError(f"{name} has negative entries (min {t.min().item():.3g}); a belief must lie on the simplex")
    err = (t.sum(dim=-1) - 1.0).abs().max().item()
    if err > atol:
        raise ValueError(f"{name} does not sum to 1 over its last dimension (max |sum − 1| = {err:.3g} > {atol:g})")
    return t


def check_labels(labels: Tensor | list, num_classes: int, name: str = "labels") -> Tensor:
    """Validate integer class labels in [0, num_classes); returns an int64 tensor of the same shape."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    t = torch.as_tensor(labels)
    if t.numel() == 0:
        return t.to(torch.int64)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {t.dtype}")
    t = t.to(torch.int64)
    if t.min() < 0 or t.max() >= num_classes:
        raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{t.min().item()}, {t.max().item()}]")
    return t


def check_nonnegative(x: Tensor | float, name: str) -> Tensor:
    """Validate a finite, non-negative real (tensor); returns float64."""
    t = as_float64(x, name)
    if (t < 0).any():
        raise ValueError(f"{name} must be >= 0, got min {t.min().item():.3g}")
    return t
