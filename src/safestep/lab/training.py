"""A deterministic minibatch training loop for the lab: plain, clipped (norm or AGC), SafeStep-guarded or
gradient-direction-controlled steps.

One step = forward on a minibatch, cross-entropy, backward, (clip), optimizer step with the scheduled LR.
Minibatches come from per-epoch permutations drawn from a generator seeded by ``seed``, so two runs with the
same model initialisation, data and seed see identical batches. A non-finite training loss is recorded and ends
the run (``diverged``). This module never prints; pass ``progress`` to observe steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split

__all__ = [
    "GUARDS",
    "LRSchedule",
    "OptimizerFactory",
    "StepRecord",
    "EvalRecord",
    "TrainResult",
    "constant_lr",
    "lr_spike",
    "evaluate",
    "train",
]

GUARDS = ("none", "clip", "agc", "safestep", "grad-proxy")
SELF_MEASURING = ("safestep", "grad-proxy")  # guards that record τ, ρ and r themselves
LRSchedule = Callable[[int], float]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def constant_lr(lr: float) -> LRSchedule:
    """η(t) = lr for every step t."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    return lambda step: lr


def lr_spike(base_lr: float, factor: float, start: int, stop: int) -> LRSchedule:
    """η(t) = base_lr·factor for start ≤ t < stop, else base_lr (0-based steps; the spike is held, not a single step)."""
    if not base_lr > 0 or not factor > 0:
        raise ValueError(f"base_lr and factor must be positive, got base_lr={base_lr}, factor={factor}")
    if not 0 <= start <= stop:
        raise ValueError(f"the spike window needs 0 <= start <= stop, got start={start}, stop={stop}")
    return lambda step: base_lr * factor if start <= step < stop else base_lr


@dataclass
class StepRecord:
    """One training step: LR used, minibatch loss before the update and, when measured, the guard's numbers.

    tau = ‖Δθ‖ proposed by the optimizer, rho = the bound along Δθ, r = tau/rho, scale = factor applied to Δθ.
    """

    step: int
    lr: float
    loss: float
    tau: float | None = None
    rho: float | None = None
    r: float | None = None
    scale: float | None = None
    skipped: bool = False


@dataclass
class EvalRecord:
    """Test-set accuracy and mean cross-entropy after ``step`` updates."""

    step: int
    accuracy: float
    loss: float


@dataclass
class TrainResult:
    """Per-step records, periodic test evaluations and the final test metrics of one run."""

    steps: list[StepRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    test_accuracy: float = math.nan
    test_loss: float = math.nan
    diverged: bool = False
    diverged_at: int | None = None
    seconds: float = 0.0

    @property
    def max_r(self) -> float | None:
        """max_t τ_t/ρ_t over the measured steps (None when r was not measured)."""
        values = [s.r for s in self.steps if s.r is not None and not math.isnan(s.r)]
        return max(values) if values else None

    @property
    def steps_capped(self) -> int:
        """Number of applied steps whose update was shrunk (scale < 1, skipped steps excluded)."""
        return sum(1 for s in self.steps if s.scale is not None and s.scale < 1.0 and not s.skipped)

    @property
    def steps_skipped(self) -> int:
        """Number of steps the guard refused (parameters left at θ0)."""
        return sum(1 for s in self.steps if s.skipped)

    def series(self, name: str, length: int) -> list[float]:
        """StepRecord field ``name`` per step 0..length−1 as floats; NaN where unmeasured or after the run stopped."""
        if name not in StepRecord.__dataclass_fields__:
            raise ValueError(f"unknown step field {name!r}; choose one of {list(StepRecord.__dataclass_fields__)}")
        values = [getattr(s, name) for s in self.steps[:length]]
        return [math.nan if v is None else float(v) for v in values] + [math.nan] * (length - len(values))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats stay floats; serialise with allow_nan or convert them)."""
        return {**asdict(self), "max_r": self.max_r, "steps_capped": self.steps_capped, "steps_skipped": self.steps_skipped}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(accuracy, mean CE) in eval mode; a sample whose logits are not all finite counts as misclassified."""
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
    finally:
        model.train(was_training)
    finite = torch.isfinite(logits).all(dim=1)
    correct = (logits.argmax(dim=1) == y) & finite
    return float(correct.float().mean()), float(F.cross_entropy(logits, y))


def _minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches: a fresh permutation each epoch, cut into chunks (the last chunk may be smaller)."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


def _wrap_in_guard(optimizer: torch.optim.Optimizer, model: nn.Module, options: Mapping[str, Any]) -> torch.optim.Optimizer:
    from safestep.guard import SafeStep

    return SafeStep(optimizer, model, **{"r": 1.0, "mode": "cap", **options})


def _monitor_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The guard options of a read-only SafeStep: same bound, estimator and probe rows; nothing is scaled."""
    return {key: value for key, value in options.items() if key not in ("r", "mode")} | {"mode": "monitor"}


def _report_fields(report: Any) -> dict[str, Any]:
    return {
        "tau": float(report.tau),
        "rho": float(report.rho),
        "r": float(report.r),
        "scale": float(report.scale),
        "skipped": bool(report.skipped),
    }


def _make_update(
    optimizer: torch.optim.Optimizer, model: nn.Module, guard: str, clip_norm: float,
    options: Mapping[str, Any], monitored: bool,
) -> Callable[[Tensor], dict[str, Any]]:
    """The post-backward part of a step, as update(x) -> the StepRecord fields it measured."""
    from .baselines import GradientDirectionController, adaptive_grad_clip_

    controller = GradientDirectionController(model, **options) if guard == "grad-proxy" else None

    def update(inputs: Tensor) -> dict[str, Any]:
        if guard == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        if guard == "agc":
            adaptive_grad_clip_(model.parameters(), **options)
        if guard == "safestep" or monitored:
            optimizer.step(inputs=inputs)
            return _report_fields(optimizer.last_report)
        if controller is not None:
            return controller.step(optimizer, inputs)
        optimizer.step()
        return {}

    return update


def train(
    model: nn.Module,
    optimizer_factory: OptimizerFactory,
    data: Split,
    steps: int,
    batch_size: int = 64,
    lr_schedule: LRSchedule | None = None,
    guard: str | None = None,
    seed: int = 0,
    clip_norm: float = 1.0,
    guard_options: Mapping[str, Any] | None = None,
    monitor: bool = False,
    eval_every: int = 0,
    progress: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Minimise mean CE(model(x), y) over ``steps`` minibatch steps; θ ← θ + s·Δθ with s = 1 unless guarded.

    guard: None/"none" (plain), "clip" (``clip_grad_norm_(clip_norm)`` before the step), "agc"
    (``adaptive_grad_clip_(params, **guard_options)`` before the step), "safestep"
    (``SafeStep(optimizer, model, r=1, mode="cap", **guard_options)``) or "grad-proxy" (the paper code's
    ``GradientDirectionController(model, **guard_options)``: lr_eff = min(lr, ρ_g/‖g‖), ρ_g along −g).
    With ``monitor=True`` a plain or clipped run also records τ, ρ and r = τ/ρ of every applied step (same
    probe and bound as the guard, ``guard_options`` passed to it; the step itself is untouched).
    lr_schedule(t) sets every param group's LR before step t (None keeps the optimizer's LR).
    eval_every > 0 also records test metrics before training and every that many steps; the final metrics are
    always recorded.
    """
    guard = "none" if guard is None else guard
    if guard not in GUARDS:
        raise ValueError(f"unknown guard {guard!r}; choose one of {GUARDS}")
    if steps < 0 or batch_size < 1 or eval_every < 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, eval_every >= 0; got {steps}, {batch_size}, {eval_every}")
    if monitor and guard in SELF_MEASURING:
        raise ValueError(f"monitor=True measures unguarded runs; a {guard!r} run already records τ, ρ and r")

    options = dict(guard_options or {})
    optimizer = optimizer_factory(model.parameters())
    if guard == "safestep" or monitor:
        optimizer = _wrap_in_guard(optimizer, model, _monitor_options(options) if monitor else options)
    update = _make_update(optimizer, model, guard, clip_norm, options, monitor)

    generator = torch.Generator().manual_seed(seed)
    batches = _minibatches(len(data.y_train), batch_size, generator)
    result = TrainResult()
    started = time.perf_counter()
    if eval_every:
        result.evals.append(EvalRecord(0, *evaluate(model, data.x_test, data.y_test)))
    model.train()
    for step in range(steps):
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(step)
        lr = float(optimizer.param_groups[0]["lr"])
        idx = next(batches)
        x, y = data.x_train[idx], data.y_train[idx]
        loss = F.cross_entropy(model(x), y)
        record = StepRecord(step=step, lr=lr, loss=loss.item())
        if not math.isfinite(record.loss):
            result.steps.append(record)
            result.diverged, result.diverged_at = True, step
            if progress is not None:
                progress(record)
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for key, value in update(x).items():
            setattr(record, key, value)
        result.steps.append(record)
        if eval_every and (step + 1) % eval_every == 0:
            result.evals.append(EvalRecord(step + 1, *evaluate(model, data.x_test, data.y_test)))
        if progress is not None:
            progress(record)
    result.test_accuracy, result.test_loss = evaluate(model, data.x_test, data.y_test)
    done = len(result.steps) - (1 if result.diverged else 0)
    if not result.evals or result.evals[-1].step != done:
        result.evals.append(EvalRecord(done, result.test_accuracy, result.test_loss))
    result.seconds = time.perf_counter() - started
    return result
