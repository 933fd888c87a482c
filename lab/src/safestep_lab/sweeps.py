"""One-step line sweeps for the lab: how loss, accuracy and predictions change along θ + τ·v.

The phase-transition, temperature and random-direction experiments all train a classifier, pick unit
directions v (the descent direction −∇L/‖∇L‖ or Gaussian random ones), measure the radius ρ_a = π/max_x Δ_a(x; v)
along v with ``safestep.probe.LogitProbe`` and then evaluate the network at θ + τ·v over a grid of step lengths
τ (often τ = r·ρ_a). Everything here is measured on the network in eval mode (batch norms use running
statistics, recalibrated on the training split after training), through ``torch.func.functional_call`` so the
model's parameters are never written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from safestep.norm import global_norm
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from safestep.geometry import radius_lower_bound
from safestep.probe import LogitProbe
from .data import Split
from .evaluation import recalibrate_batch_norm, recalibrated_metrics
from .training import StepRecord, TrainResult, train

__all__ = [
    "Direction",
    "TemperatureScaled",
    "LineSweep",
    "parameters_of",
    "unit_direction",
    "descent_direction",
    "random_direction",
    "logit_radius",
    "line_sweep",
    "first_crossing",
    "recalibrate_batch_norm",
    "train_classifier",
    "train_to_accuracy",
    "finite_stats",
    "format_stats",
]

Direction = dict[str, Tensor]
OPTIMIZERS = ("adam", "adamw")


class TemperatureScaled(nn.Module):
    """z/T: the wrapped model's logits divided by a temperature T > 0 (training it minimises CE(z/T))."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the wrapped model divided by T."""
        return self.model(x) / self.temperature


@dataclass(frozen=True)
class LineSweep:
    """Loss, accuracy and prediction flips at θ + τ·v for every τ in ``steps`` (τ = 0 values in ``base_*``)."""

    steps: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    flip_fraction: np.ndarray
    base_loss: float
    base_accuracy: float

    @property
    def loss_ratio(self) -> np.ndarray:
        """L(θ + τv)/L(θ) (inf where the loss is not finite)."""
        ratio = self.loss / self.base_loss
        return np.where(np.isfinite(ratio), ratio, np.inf)

    @property
    def accuracy_retained(self) -> np.ndarray:
        """acc(θ + τv)/acc(θ)."""
        return self.accuracy / self.base_accuracy


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    """θ: the trainable parameters by name, detached (no copy)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def unit_direction(tensors: dict[str, Tensor]) -> Direction:
    """v/‖v‖ with one global L2 norm over all tensors (ValueError for a zero or non-finite norm)."""
    norm = float(global_norm(list(tensors.values())))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"cannot normalise a direction of norm {norm}")
    return {name: t / norm for name, t in tensors.items()}


def _eval_mode(model: nn.Module) -> Callable[[], None]:
    """Switch to eval mode; returns a function restoring the previous mode."""
    was_training = model.training
    model.eval()
    return lambda: model.train(was_training)


def descent_direction(model: nn.Module, x: Tensor, y: Tensor) -> Direction:
    """v = −∇L(θ)/‖∇L(θ)‖ for L = mean CE(model(x), y), in eval mode (the model's .grad is left untouched)."""
    restore = _eval_mode(model)
    try:
        params = {name: p.detach().requires_grad_(True) for name, p in parameters_of(model).items()}
        loss = F.cross_entropy(functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, list(params.values()))
    finally:
        restore()
    return unit_direction({name: -g for name, g in zip(params, grads)})


def random_direction(model: nn.Module, generator: torch.Generator) -> Direction:
    """v = g/‖g‖ with g ~ N(0, I) drawn per tensor (in parameter order) from ``generator``."""
    return unit_direction({
        name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in parameters_of(model).items()
    })


def logit_radius(model: nn.Module, direction: Direction, x: Tensor) -> float:
    """ρ_a = π / max_x Δ_a(x; v), Δ_a = max_k a_k − min_k a_k of the exact JVP slopes a = J_z v (eval mode)."""
    restore = _eval_mode(model)
    try:
        slopes = LogitProbe(model)(parameters_of(model), direction, x, method="jvp").slopes
    finally:
        restore()
    return float(radius_lower_bound(slopes).min())


def _predict(model: nn.Module, params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    """Mean CE and predicted classes (−1 where the logits are not all finite)."""
    logits = functional_call(model, params, (x,))
    finite = torch.isfinite(logits).all(dim=1)
    loss = float(F.cross_entropy(logits, y)) if bool(finite.all()) else math.inf
    return loss, torch.where(finite, logits.argmax(dim=1), torch.full_like(y, -1))


@torch.no_grad()
def line_sweep(model: nn.Module, direction: Direction, steps: Sequence[float] | np.ndarray, x: Tensor,
               y: Tensor) -> LineSweep:
    """L, accuracy and flip fraction (share of samples whose predicted class differs from θ's) at θ + τv, τ ∈ steps."""
    grid = np.asarray(steps, dtype=float)
    if grid.ndim != 1 or grid.size == 0 or not np.all(np.isfinite(grid)):
        raise ValueError("steps must be a non-empty 1-D sequence of finite step lengths")
    restore = _eval_mode(model)
    try:
        theta = parameters_of(model)
        base_loss, base_pred = _predict(model, theta, x, y)
        losses, accuracies, flips = [], [], []
        for tau in grid:
            loss, pred = _predict(model, {n: t + float(tau) * direction[n] for n, t in theta.items()}, x, y)
            losses.append(loss)
            accuracies.append(float((pred == y).float().mean()))
            flips.append(float((pred != base_pred).float().mean()))
    finally:
        restore()
    base_accuracy = float((base_pred == y).float().mean())
    return LineSweep(grid, np.array(losses), np.array(accuracies), np.array(flips), base_loss, base_accuracy)


def first_crossing(grid: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray, threshold: float,
                   rising: bool = True) -> float:
    """The smallest x with value ≥ threshold (rising) or < threshold (falling), interpolated linearly in log x.

    Between the last grid point before the crossing and the first one after it, the value is taken as linear
    in log x; a non-finite value after the crossing gives that grid point itself. Returns grid[0] when the
    first point already crosses and inf when no point does. ``grid`` must be positive and increasing.
    """
    xs, ys = np.asarray(grid, dtype=float), np.asarray(values, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size == 0:
        raise ValueError(f"grid and values must be 1-D of the same non-zero length, got {xs.shape} and {ys.shape}")
    if np.any(xs <= 0) or np.any(np.diff(xs) <= 0):
        raise ValueError("grid must be positive and strictly increasing")
    crossed = np.isnan(ys) | (ys >= threshold if rising else ys < threshold)
    hits = np.flatnonzero(crossed)
    if hits.size == 0:
        return math.inf
    i = int(hits[0])
    if i == 0 or not np.isfinite(ys[i]):
        return float(xs[i])
    fraction = (threshold - ys[i - 1]) / (ys[i] - ys[i - 1])
    return float(np.exp(np.log(xs[i - 1]) + fraction * (np.log(xs[i]) - np.log(xs[i - 1]))))


def train_classifier(model: nn.Module, data: Split, steps: int, lr: float, seed: int, batch_size: int = 64,
                     optimizer: str = "adam", weight_decay: float = 0.0,
                     progress: Callable[[StepRecord], None] | None = None) -> TrainResult:
    """Minimise mean CE(model(x), y) with Adam/AdamW minibatch steps, then recalibrate batch norms on x_train."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    make = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    result = train(model, lambda p: make(p, lr=lr, weight_decay=weight_decay), data, steps, batch_size=batch_size,
                   seed=seed, progress=progress)
    recalibrate_batch_norm(model, data.x_train)
    return result


class _TargetReached(Exception):
    """Raised from the progress callback to end training once the target accuracy is reached."""


def train_to_accuracy(model: nn.Module, data: Split, target: float, max_steps: int, lr: float, seed: int,
                      batch_size: int = 64, check_every: int = 50) -> tuple[int, float]:
    """Adam minibatch steps until the test accuracy reaches ``target`` (checked every ``check_every`` steps, eval
    mode with batch norms recalibrated on x_train) or ``max_steps``; returns (steps taken, final test accuracy).

    The model ends with its batch norms recalibrated on x_train, as after ``train_classifier``.
    """
    if not 0 < target <= 1 or max_steps < 1 or check_every < 1:
        raise ValueError(f"need 0 < target <= 1, max_steps >= 1, check_every >= 1; got {target}, {max_steps}, "
                         f"{check_every}")
    taken = [max_steps]

    def check(record: StepRecord) -> None:
        if (record.step + 1) % check_every == 0 and recalibrated_metrics(model, data)[0] >= target:
            taken[0] = record.step + 1
            raise _TargetReached

    try:
        train(model, lambda p: torch.optim.Adam(p, lr=lr), data, max_steps, batch_size=batch_size, seed=seed,
              progress=check)
    except _TargetReached:
        pass
    recalibrate_batch_norm(model, data.x_train)
    return taken[0], recalibrated_metrics(model, data)[0]


def finite_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std (population), median, min, max over the finite values; n and n_inf count all / non-finite ones."""
    array = np.asarray(values, dtype=float)
    finite = array[np.isfinite(array)]
    summary = {"n": int(array.size), "n_inf": int(array.size - finite.size)}
    if finite.size == 0:
        return {**summary, **dict.fromkeys(("mean", "std", "median", "min", "max"), math.nan)}
    return {**summary, "mean": float(finite.mean()), "std": float(finite.std()), "median": float(np.median(finite)),
            "min": float(finite.min()), "max": float(finite.max())}


def format_stats(summary: dict[str, float], digits: int = 2, beyond: str = "beyond the grid") -> str:
    """'m ± s' of a ``finite_stats`` summary, adding how many values were non-finite (e.g. never crossed)."""
    if summary["n_inf"] == summary["n"]:
        return beyond
    text = f"{summary['mean']:.{digits}g} ± {summary['std']:.{digits}g}"
    return text + (f" ({summary['n_inf']}/{summary['n']} {beyond})" if summary["n_inf"] else "")
