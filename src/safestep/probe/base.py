"""What every probe shares: the step it probes along, the slopes it returns, the probe protocol and the FD step rule.

A probe measures a = J_z(θ0)·v, the derivative of the logits along the unit direction v = Δθ/τ of a proposed update
Δθ = θ1 − θ0 with τ = ‖Δθ‖ (docs/geometry.md). Probes never normalize Δθ into a new buffer: the tangent is Δθ itself
and the slopes are divided by τ afterwards (a JVP is linear in its tangent).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .inputs import Inputs

__all__ = ["METHODS", "Displacement", "Slopes", "Probe", "fd_step", "central_difference", "forward_difference",
           "probe_dtype", "is_missing_forward_ad"]

METHODS = ("auto", "jvp", "fd", "reuse")
"""Slope estimators: forward-mode AD (exact), a central difference (two forwards), "reuse" (one forward: a one-sided
difference from the training forward's own logits; valid only where that forward is the deterministic function the
probe evaluates), and "auto" (the JVP, central differences where an operation has no forward-mode rule)."""


class Displacement:
    """θ0 and the proposed update Δθ = θ1 − θ0 (tensor lists, parameter order), τ = ‖Δθ‖ and ‖θ0‖ (0-dim float64);
    ‖θ0‖ may be given as a function, computed the first time ``theta_norm`` is read, and kept."""

    def __init__(self, theta0: list[Tensor], delta: list[Tensor], tau: Tensor,
                 theta_norm: Tensor | Callable[[], Tensor]) -> None:
        self.theta0, self.delta, self.tau = theta0, delta, tau
        self._theta_norm = theta_norm

    @property
    def inverse_tau(self) -> Tensor:
        """1/τ, and 0 for a zero update (lr = 0): the slopes along no direction are 0, never NaN."""
        return torch.where(self.tau > 0, 1.0 / self.tau, torch.zeros_like(self.tau))

    @property
    def theta_norm(self) -> Tensor:
        """‖θ0‖ (0-dim float64)."""
        if callable(self._theta_norm):
            self._theta_norm = self._theta_norm()
        return self._theta_norm


@dataclass(frozen=True)
class Slopes:
    """Logits z(θ0) and slopes a = dz/dτ along the unit direction, both (..., K); ``method`` says how, ``note`` why."""

    logits: Tensor
    slopes: Tensor
    method: str
    note: str = ""


@runtime_checkable
class Probe(Protocol):
    """Slopes of a model's logits along a proposed update: dense (functional) and sharded (in-place) probes alike."""

    def uses_batch_statistics(self) -> bool:
        """True when batch rows are coupled (train-mode batch norm), so a row subset is a different function."""
        ...

    def along(self, params: Sequence[Tensor], step: Displacement, inputs: Inputs, method: str,
              reference: Tensor | None = None) -> Slopes:
        """a = J_z(θ0)·Δθ/τ for the trainable tensors ``params`` (live parameters, in ``step``'s order);
        ``reference``: z(θ0) from the training forward, which method "reuse" needs."""
        ...


def probe_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a probe computes in: float32 for half-precision parameters (bf16/fp16), the dtype itself otherwise."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def fd_step(theta_norm: Tensor, dtype: torch.dtype, one_sided: bool = False) -> Tensor:
    """The one finite-difference step rule: h = ε^{1/3}·max(1, ‖θ0‖) central (balancing O(h²) truncation against
    O(ε/h) rounding), ε^{1/2}·max(1, ‖θ0‖) one-sided (O(h) truncation); ε is the machine epsilon of the dtype the
    difference is evaluated in (``probe_dtype``: float32 for half-precision models)."""
    eps = torch.finfo(probe_dtype(dtype)).eps
    return eps ** (0.5 if one_sided else 1.0 / 3.0) * torch.clamp(theta_norm.to(torch.float64), min=1.0)


def central_difference(plus: Tensor, minus: Tensor, h: Tensor | float) -> Slopes:
    """The package's one difference quotient: logits (z₊ + z₋)/2 and slopes (z₊ − z₋)/2h from z± = z(θ0 ± h·v)."""
    return Slopes((plus + minus) / 2, (plus - minus) / (2 * h), "fd")


def forward_difference(base: Tensor, plus: Tensor, h: Tensor | float) -> Slopes:
    """The one-sided quotient of method "reuse": logits z₀ and slopes (z₊ − z₀)/h from z₊ = z(θ0 + h·v), z₀ = z(θ0)
    (first order: its error is O(h·|d²z/dτ²|) plus rounding O(ε|z|/h))."""
    return Slopes(base, (plus - base) / h, "reuse")


_FORWARD_AD_PHRASES = ("forward ad", "forward-mode", "forward mode", "jvp")


def is_missing_forward_ad(error: BaseException) -> bool:
    """True for torch's "this operation has no forward-mode AD rule" errors (and nothing else, e.g. not OOM)."""
    text = str(error).lower()
    if not isinstance(error, (NotImplementedError, RuntimeError)) or "out of memory" in text:
        return False
    return any(phrase in text for phrase in _FORWARD_AD_PHRASES) and (
        isinstance(error, NotImplementedError) or "not implemented" in text or "not supported" in text
    )
