"""Input checks of the lab's own math (curvature comparators, belief dynamics); each raises ValueError naming it.

The library validates its public functions privately; the lab may use the library's public API only, so the few
checks its own math needs are written here.
"""
from __future__ import annotations

import torch
from torch import Tensor

_REAL_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def real_tensor(x: Tensor | float | list, name: str) -> Tensor:
    """``x`` as a non-empty, finite float64 tensor; Python numbers and lists are read straight into float64."""
    try:
        t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a real numeric tensor, got {type(x).__name__}") from error
    if not (t.is_floating_point() or t.dtype in _REAL_INTEGERS):
        raise ValueError(f"{name} must be a real numeric tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    t = t.detach().to(torch.float64) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains {'NaN' if torch.isnan(t).any() else 'inf'} values; it must be finite")
    return t


def class_vectors(x: Tensor | list, name: str, min_classes: int) -> Tensor:
    """A validated (..., K) float64 tensor with K >= ``min_classes``."""
    t = real_tensor(x, name)
    if t.ndim == 0 or t.shape[-1] < min_classes:
        raise ValueError(f"{name} needs a last (class) dimension K >= {min_classes}, got shape {tuple(t.shape)}")
    return t


def belief(x: Tensor | list, name: str, atol: float = 1e-6) -> Tensor:
    """A validated (..., K) belief on the closed simplex: K >= 2, entries >= 0, |Σ_k p_k − 1| <= atol."""
    t = class_vectors(x, name, 2)
    if (t < 0).any():
        raise ValueError(f"{name} has negative entries (min {t.min().item():.3g}); a belief must lie on the simplex")
    err = (t.sum(dim=-1) - 1.0).abs().max().item()
    if err > atol:
        raise ValueError(f"{name} does not sum to 1 over its last dimension (max |sum − 1| = {err:.3g} > {atol:g})")
    return t


def belief_pair(p: Tensor, q: Tensor, name_p: str, name_q: str) -> tuple[Tensor, Tensor]:
    """Two validated beliefs of the same shape."""
    a, b = belief(p, name_p), belief(q, name_q)
    if a.shape != b.shape:
        raise ValueError(f"{name_p} has shape {tuple(a.shape)} but {name_q} has shape {tuple(b.shape)} (must match)")
    return a, b


def nonnegative(x: Tensor | float, name: str) -> Tensor:
    """A validated finite, non-negative float64 tensor."""
    t = real_tensor(x, name)
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
