"""The lab's one training loop (``run_steps``) and its minibatch front end for the digits experiments (``train``).

One step = the scheduled LR, a batch, forward, loss, backward, then a *stepper* that does the rest and returns the
guard's ``StepReport`` if one measured the step. Steppers for the digits come from step rules: plain, clipped (norm
or AGC), SafeStep-guarded or gradient-direction-controlled steps, optionally monitored; the language-model
experiments pass their own (lm_common). Each step leaves a ``StepRecord`` (LR, loss, report). A non-finite training
loss is recorded and ends the run. ``train`` draws minibatches from per-epoch permutations of a generator seeded by
``seed``, so two runs with the same model initialisation, data and seed see identical batches. This module never
prints; pass ``progress`` or ``after_step`` to observe steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safestep.telemetry import StepReport

from .data import Split

__all__ = [
    "Batch",
    "StepRule",
    "Stepper",
    "plain",
    "clipped",
    "adaptive_clipped",
    "guarded",
    "gradient_direction",
    "LRSchedule",
    "OptimizerFactory",
    "StepRecord",
    "EvalRecord",
    "TrainResult",
    "constant_lr",
    "lr_spike",
    "evaluate",
    "run_steps",
    "train",
]

LRSchedule = Callable[[int], float]
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Batch:
    """One step's batch as a stepper sees it: the inputs, the labels, the training forward's logits and its loss."""

    step: int
    inputs: Tensor
    labels: Tensor
    logits: Tensor
    loss: Tensor


Stepper = Callable[[Batch], "StepReport | None"]
"""stepper(batch): the post-backward part of a training step; returns the guard's report, if one measured it."""
StepRule = Callable[[nn.Module, torch.optim.Optimizer], "tuple[torch.optim.Optimizer, Stepper]"]
"""rule(model, optimizer) -> (the optimizer whose LRs the schedule sets, the stepper)."""


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
    """One training step: the LR used, the minibatch loss before the update and, when measured, the guard's report.

    ``tau``, ``rho``, ``r_proposed`` = τ/ρ, ``scale`` and ``r_applied`` = s·τ/ρ are read from the report (None when
    the step was not measured); ``skipped`` says whether the parameters were left at θ0.
    """

    step: int
    lr: float
    loss: float
    report: StepReport | None = None

    def _field(self, name: str) -> Any:
        return None if self.report is None else getattr(self.report, name)

    tau = property(lambda self: self._field("tau"), doc="‖Δθ‖ proposed by the optimizer")
    rho = property(lambda self: self._field("rho"), doc="the radius along Δθ")
    r_proposed = property(lambda self: self._field("r_proposed"), doc="τ/ρ before scaling")
    scale = property(lambda self: self._field("scale"), doc="the factor applied to Δθ")
    r_applied = property(lambda self: self._field("r_applied"), doc="s·τ/ρ, the applied step in radius units")
    skipped = property(lambda self: bool(self.report is not None and self.report.skipped), doc="left at θ0")

    def to_dict(self) -> dict[str, Any]:
        """step, lr, loss and the report's fields, flat."""
        return {"step": self.step, "lr": self.lr, "loss": self.loss,
                **({} if self.report is None else self.report.as_dict())}


SERIES = ("lr", "loss", "tau", "rho", "r_proposed", "scale", "r_applied")


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
        """max_t τ_t/ρ_t (proposed) over the measured steps (None when r was not measured)."""
        values = [s.r_proposed for s in self.steps if s.r_proposed is not None and not math.isnan(s.r_proposed)]
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
        """StepRecord value ``name`` per step 0..length−1 as floats; NaN where unmeasured or after the run stopped."""
        if name not in SERIES:
            raise ValueError(f"unknown step field {name!r}; choose one of {SERIES}")
        values = [getattr(s, name) for s in self.steps[:length]]
        return [math.nan if v is None else float(v) for v in values] + [math.nan] * (length - len(values))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats stay floats; serialise with allow_nan or convert them)."""
        return {**{k: v for k, v in asdict(self).items() if k != "steps"}, "steps": [s.to_dict() for s in self.steps],
                "max_r": self.max_r, "steps_capped": self.steps_capped, "steps_skipped": self.steps_skipped}


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


def _monitored(optimizer: torch.optim.Optimizer, model: nn.Module, monitor: Mapping[str, Any] | None) -> torch.optim.Optimizer:
    """The optimizer, wrapped in a read-only SafeStep (mode="monitor") when ``monitor`` gives its options."""
    if monitor is None:
        return optimizer
    from safestep.guard import SafeStep

    return SafeStep(optimizer, model, **{**monitor, "mode": "monitor"})


def _gradient_rule(transform: Callable[[nn.Module], None] | None, monitor: Mapping[str, Any] | None) -> StepRule:
    """A rule that transforms the gradients (or not), then lets the (optionally monitored) optimizer step."""

    def rule(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, Stepper]:
        stepping = _monitored(optimizer, model, monitor)

        def step(batch: Batch) -> StepReport | None:
            if transform is not None:
                transform(model)
            if monitor is None:
                stepping.step()
                return None
            stepping.step(inputs=batch.inputs)
            return stepping.last_report

        return stepping, step

    return rule


def plain(monitor: Mapping[str, Any] | None = None) -> StepRule:
    """θ ← θ + Δθ (the optimizer's own step); ``monitor`` = SafeStep options to record τ, ρ and r without changing it."""
    return _gradient_rule(None, monitor)


def clipped(max_norm: float = 1.0, monitor: Mapping[str, Any] | None = None) -> StepRule:
    """``clip_grad_norm_(max_norm)`` before the optimizer's step (optionally monitored)."""
    return _gradient_rule(lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm), monitor)


def adaptive_clipped(monitor: Mapping[str, Any] | None = None, **agc_options: float) -> StepRule:
    """``adaptive_grad_clip_(params, **agc_options)`` (AGC) before the optimizer's step (optionally monitored)."""
    from .baselines import adaptive_grad_clip_

    return _gradient_rule(lambda model: adaptive_grad_clip_(model.parameters(), **agc_options), monitor)


def guarded(**options: Any) -> StepRule:
    """``SafeStep(optimizer, model, r=1, mode="cap", **options)``: the guard bounds every step."""

    def rule(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, Stepper]:
        from safestep.guard import SafeStep

        guard = SafeStep(optimizer, model, **{"r": 1.0, "mode": "cap", **options})

        def step(batch: Batch) -> StepReport | None:
            guard.step(inputs=batch.inputs)
            return guard.last_report

        return guard, step

    return rule


def gradient_direction(**options: Any) -> StepRule:
    """The paper code's controller (``GradientDirectionController(model, **options)``): lr_eff = min(lr, ρ_g/‖g‖)."""

    def rule(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[torch.optim.Optimizer, Stepper]:
        from .baselines import GradientDirectionController

        controller = GradientDirectionController(model, **options)
        return optimizer, lambda batch: controller.step(optimizer, batch.inputs)

    return rule


def run_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    stepper: Stepper,
    batches: Callable[[int], tuple[Tensor, Tensor]],
    steps: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    lr_schedule: LRSchedule | None = None,
    after_step: Callable[[StepRecord], None] | None = None,
) -> list[StepRecord]:
    """The loop: for t < steps, η ← lr_schedule(t), (x, y) ← batches(t), L = loss_fn(model(x), y), ∇L, stepper.

    lr_schedule(t) sets every param group's LR of ``optimizer`` (None keeps its LR). A non-finite L is recorded and
    ends the run: the last record then has a non-finite loss and no report. ``after_step(record)`` runs after every
    completed step (not after the non-finite one).
    """
    records: list[StepRecord] = []
    model.train()
    for step in range(steps):
        if lr_schedule is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_schedule(step)
        inputs, labels = batches(step)
        logits = model(inputs)
        loss = loss_fn(logits, labels)
        record = StepRecord(step=step, lr=float(optimizer.param_groups[0]["lr"]), loss=loss.item())
        records.append(record)
        if not math.isfinite(record.loss):
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        record.report = stepper(Batch(step, inputs, labels, logits, loss))
        if after_step is not None:
            after_step(record)
    return records


def train(
    model: nn.Module,
    optimizer_factory: OptimizerFactory,
    data: Split,
    steps: int,
    batch_size: int = 64,
    lr_schedule: LRSchedule | None = None,
    rule: StepRule | None = None,
    seed: int = 0,
    eval_every: int = 0,
    progress: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Minimise mean CE(model(x), y) over ``steps`` minibatch steps; after each backward, ``rule`` updates θ.

    ``rule`` is a step rule (``plain()`` by default, ``clipped()``, ``adaptive_clipped()``, ``guarded()``,
    ``gradient_direction()``). lr_schedule(t) sets every param group's LR before step t (None keeps the optimizer's
    LR). eval_every > 0 also records test metrics before training and every that many steps; the final metrics are
    always recorded.
    """
    if steps < 0 or batch_size < 1 or eval_every < 0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, eval_every >= 0; got {steps}, {batch_size}, {eval_every}")
    optimizer, update = (rule or plain())(model, optimizer_factory(model.parameters()))

    generator = torch.Generator().manual_seed(seed)
    indices = _minibatches(len(data.y_train), batch_size, generator)

    def batches(step: int) -> tuple[Tensor, Tensor]:
        idx = next(indices)
        return data.x_train[idx], data.y_train[idx]

    def after_step(record: StepRecord) -> None:
        if eval_every and (record.step + 1) % eval_every == 0:
            result.evals.append(EvalRecord(record.step + 1, *evaluate(model, data.x_test, data.y_test)))
        if progress is not None:
            progress(record)

    result = TrainResult()
    started = time.perf_counter()
    if eval_every:
        result.evals.append(EvalRecord(0, *evaluate(model, data.x_test, data.y_test)))
    result.steps = run_steps(model, optimizer, update, batches, steps, lr_schedule=lr_schedule, after_step=after_step)
    if result.steps and not math.isfinite(result.steps[-1].loss):
        result.diverged, result.diverged_at = True, result.steps[-1].step
        if progress is not None:
            progress(result.steps[-1])
    result.test_accuracy, result.test_loss = evaluate(model, data.x_test, data.y_test)
    done = len(result.steps) - (1 if result.diverged else 0)
    if not result.evals or result.evals[-1].step != done:
        result.evals.append(EvalRecord(done, result.test_accuracy, result.test_loss))
    result.seconds = time.perf_counter() - started
    return result
