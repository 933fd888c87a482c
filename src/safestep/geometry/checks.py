"""Input validation shared by the geometry layer (public, so tools built on it validate alike): every check raises
ValueError naming the problem."""
from __future__ import annotations

import torch
from torch import Tensor

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def as_float64(x: Tensor | float | list, name: str, *, finite: bool = True) -> Tensor:
    """``x`` as float64 (Python numbers read straight into float64); ValueError if not real, empty or not finite."""
    try:
        t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a real numeric tensor, got {type(x).__name__}") from error
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):
        raise ValueError(f"{name} must be a real numeric tensor, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); the geometry layer needs at least one value")
    t = t.detach().to(torch.float64) if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)
    if finite and not torch.isfinite(t).all():
        bad = "NaN" if torch.isnan(t).any() else "inf"
        raise ValueError(f"{name} contains {bad} values; the geometry layer needs finite input")
    return t


def class_vectors(x: Tensor | list, name: str, *, finite: bool = True) -> Tensor:
    """Validate a non-empty (..., K) tensor of per-class values with K >= 2; returns float64."""
    t = as_float64(x, name, finite=finite)
    if t.ndim == 0:
        raise ValueError(f"{name} must have a trailing class dimension of size K >= 2, got a scalar")
    if t.shape[-1] < 2:
        raise ValueError(f"{name} needs K >= 2 classes in its last dimension, got shape {tuple(t.shape)}")
    return t


def same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Raise ValueError unless ``a`` and ``b`` have identical shapes."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has {tuple(b.shape)}; they must match")


def finite_spread(spread: Tensor, name: str = "slopes") -> Tensor:
    """Return the per-row spreads Δ, raising ValueError where one overflowed float64 (max − min = ±inf)."""
    if not torch.isfinite(spread).all():
        raise ValueError(f"the spread max − min of {name} overflows float64 ({name} too large to subtract)")
    return spread


def live_mask(live: Tensor, shape: torch.Size, name: str = "live") -> Tensor:
    """Validate a bool mask broadcastable to ``shape`` (True = live class, one or more per row); return it expanded."""
    if not isinstance(live, Tensor) or live.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (True = live class), got {type(live).__name__}"
                         + (f" of dtype {live.dtype}" if isinstance(live, Tensor) else ""))
    try:
        mask = live.expand(shape)
    except RuntimeError as error:
        raise ValueError(f"{name} of shape {tuple(live.shape)} does not broadcast to {tuple(shape)}") from error
    if not mask.any(dim=-1).all():
        raise ValueError(f"a row of {name} has no live class; every row needs at least one")
    return mask


def live_values(values: Tensor, live: Tensor, name: str) -> Tensor:
    """``values`` with masked entries replaced by their row's smallest live value (live max and min unchanged).

    Masked slopes are meaningless, so later code can reduce over whole rows. Raises ValueError on NaN or ±inf at a live
    class.
    """
    if not torch.isfinite(values[live]).all():
        raise ValueError(f"{name} contains NaN or inf values at live classes (masked classes may hold anything)")
    inf = torch.tensor(float("inf"), dtype=values.dtype)
    row_min = torch.where(live, values, inf).amin(dim=-1, keepdim=True)
    return torch.where(live, values, row_min)


def softmax_line(logits: Tensor, slopes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validated float64 (z, a, live) of F(t) = Σ_k softmax(z)_k e^{a_k t}; live = z > −inf (−inf masks a class).

    Masked slopes are replaced as in ``live_values``. Raises ValueError on mismatched shapes, empty input, K < 2, NaN
    or +inf logits, a row with no live class, NaN/inf slopes at live classes, or a spread that overflows float64.
    """
    z = class_vectors(logits, "logits", finite=False)
    a = class_vectors(slopes, "slopes", finite=False)
    same_shape(z, a, "logits", "slopes")
    if torch.isnan(z).any() or (z == float("inf")).any():
        bad = "NaN" if torch.isnan(z).any() else "+inf"
        raise ValueError(f"logits contains {bad} values; only −inf (a masked class) is allowed")
    live = z > float("-inf")
    if not live.any(dim=-1).all():
        raise ValueError("a row of logits is entirely −inf: it has no live class")
    a = live_values(a, live, "slopes")
    finite_spread(a.amax(dim=-1) - a.amin(dim=-1))
    return z, a, live


def check_belief(x: Tensor | list, name: str = "p", atol: float = 1e-6) -> Tensor:
    """Validate a (..., K) belief on the closed simplex: finite, K >= 2, entries >= 0, |Σ_k p_k − 1| <= atol."""
    t = class_vectors(x, name)
    if (t < 0).any():
        raise ValueError(f"{name} has negative entries (min {t.min().item():.3g}); a belief must lie on the simplex")
    err = (t.sum(dim=-1) - 1.0).abs().max().item()
    if err > atol:
        raise ValueError(f"{name} does not sum to 1 over its last dimension (max |sum − 1| = {err:.3g} > {atol:g})")
    return t

