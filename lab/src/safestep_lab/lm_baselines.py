"""Spike defences large-LM trainers use, written for the lab's language-model experiments.

* ``ZScoreClipper`` — gradient-norm clipping against the run's own statistics, in the style of ZClip: an
  exponential moving average of the global gradient norm g and of its variance; once warmed up, a norm with
  z-score (g − μ)/σ above ``z`` is clipped to μ + z·σ. The statistics are updated with the norm actually used
  (clipped), so a spike does not inflate the threshold it is judged against.
* ``LossSpikeSkipper`` — skip the update when the training loss jumps: once warmed up, a step whose loss
  exceeds ``factor`` × the EMA of recent (accepted) losses is not applied at all (no optimizer step, so the
  optimizer's moments do not see the batch). After ``patience`` consecutive skips the new loss level is accepted
  (the EMA restarts from it), so a run whose loss has moved for good does not freeze; trainers that can restart
  from a checkpoint roll back instead, which these experiments do not model.

Both are plain objects with no torch.optim coupling: call them between ``backward()`` and ``optimizer.step()``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from safestep.norm import global_norm

__all__ = ["grad_norm", "ZScoreClipper", "LossSpikeSkipper"]


@torch.no_grad()
def grad_norm(parameters: Iterable[Tensor]) -> float:
    """The global L2 norm of the gradients of ``parameters`` (float64 accumulation; 0 when none has a gradient)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    return float(global_norm(grads))


def _check_fraction(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ValueError(f"{name} must lie in (0, 1), got {value!r}")


@dataclass
class ZScoreClipper:
    """Clip the global gradient norm to μ + z·σ of its own EMA statistics (after ``warmup`` observed steps).

    ``alpha`` is the EMA's memory (μ ← α·μ + (1 − α)·g, the same for the variance); during the first ``warmup``
    steps nothing is clipped and μ, σ² are the plain mean and variance of the norms seen. ``__call__`` returns the
    factor applied to the gradients (1.0 when not clipped); ``clipped`` counts the clipped steps.
    """

    z: float = 2.5
    alpha: float = 0.97
    warmup: int = 25
    eps: float = 1e-12
    mean: float = math.nan
    var: float = math.nan
    seen: int = 0
    clipped: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.z) and self.z > 0):
            raise ValueError(f"z must be a finite positive number, got {self.z!r}")
        _check_fraction("alpha", self.alpha)
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")

    @property
    def threshold(self) -> float:
        """μ + z·σ (inf while warming up)."""
        if self.seen < self.warmup:
            return math.inf
        return self.mean + self.z * math.sqrt(max(self.var, 0.0))

    def _observe(self, norm: float) -> None:
        self.seen += 1
        if self.seen == 1:
            self.mean, self.var = norm, 0.0
        elif self.seen <= self.warmup:  # Welford: the running mean and (population) variance of the warm-up norms
            delta = norm - self.mean
            self.mean += delta / self.seen
            self.var += (delta * (norm - self.mean) - self.var) / self.seen
        else:
            delta = norm - self.mean
            self.mean += (1.0 - self.alpha) * delta
            self.var = self.alpha * (self.var + (1.0 - self.alpha) * delta * delta)

    @torch.no_grad()
    def __call__(self, parameters: Iterable[Tensor]) -> float:
        """Scale the gradients in place if their norm is above the threshold; returns the factor used."""
        params = [p for p in parameters if p.grad is not None]
        norm = grad_norm(params)
        if not math.isfinite(norm):
            return 1.0  # leave non-finite gradients to the caller (the optimizer or the guard skips them)
        limit = self.threshold
        factor = 1.0
        if norm > limit:
            factor = limit / (norm + self.eps)
            for p in params:
                p.grad.mul_(factor)
            self.clipped += 1
        self._observe(norm * factor)
        return factor


@dataclass
class LossSpikeSkipper:
    """Skip the update when the loss exceeds ``factor`` × its EMA (after ``warmup`` accepted steps).

    ``should_skip(loss)`` decides and updates the state: accepted losses enter the EMA (memory ``alpha``);
    skipped ones do not, except that after ``patience`` consecutive skips the current loss is accepted and the
    EMA restarts from it. ``skipped`` counts the skipped steps.
    """

    factor: float = 1.5
    alpha: float = 0.95
    warmup: int = 25
    patience: int = 50
    ema: float = math.nan
    seen: int = 0
    streak: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor > 1.0):
            raise ValueError(f"factor must be a finite number > 1, got {self.factor!r}")
        _check_fraction("alpha", self.alpha)
        if self.warmup < 1 or self.patience < 1:
            raise ValueError(f"warmup and patience must be >= 1, got {self.warmup} and {self.patience}")

    def should_skip(self, loss: float) -> bool:
        """True when this step's update should not be applied (a non-finite loss is always skipped)."""
        if not math.isfinite(loss):
            self.skipped += 1
            self.streak += 1
            return True
        spike = self.seen >= self.warmup and loss > self.factor * self.ema
        if spike and self.streak < self.patience:
            self.skipped += 1
            self.streak += 1
            return True
        if spike:  # patience exhausted: accept the new level
            self.ema, self.seen = loss, self.warmup
        elif self.seen == 0:
            self.ema = loss
        elif self.seen < self.warmup:
            self.ema += (loss - self.ema) / (self.seen + 1)
        else:
            self.ema = self.alpha * self.ema + (1.0 - self.alpha) * loss
        self.seen += 1
        self.streak = 0
        return False
