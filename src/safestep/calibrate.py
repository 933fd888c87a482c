"""calibrate: which ``r`` and which probe budget, read from a short monitor-mode run of your own training
(``calibrate``) or from a history any integration wrote (``calibrate_history``): quantiles of r_proposed = τ/ρ, cap
shares, the default probe against the whole batch, seconds per step, and a ``Recommendation`` read by an explicit
``Rule`` (docs/calibrate.md). The library never imports a training script: ``load_target`` does, for the CLI."""
from __future__ import annotations

import importlib
import math
import runpy
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .guard import SafeStep
from .lr_finder import _check_int, _standalone_figure
from .probe.selection import DEFAULT_PROBE_SIZE, ProbeSize
from .telemetry import StepReport, read_reports

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["CalibrationTarget", "Rule", "ProbeComparison", "Recommendation", "Calibration", "calibrate",
           "calibrate_history", "load_target", "CANDIDATE_RADII", "DEFAULT_PROBE"]

CANDIDATE_RADII = (0.5, 1.0, 2.0)
"""The values of r whose cap share is reported and among which the rule chooses."""
DEFAULT_PROBE: ProbeSize = DEFAULT_PROBE_SIZE
"""SafeStep's default probe budget, the one the run measures on every step."""
QUANTILES = (0.5, 0.9, 0.99, 1.0)
Progress = Callable[[str, int, int], None]
"""progress(phase, done, total), called after every training step of the run."""


@dataclass(frozen=True)
class CalibrationTarget:
    """The user's training: ``train_step(optimizer)`` is one step of the loop (zero the gradients, forward(s) on the
    next batch, backward, ``optimizer.step()``) on the optimizer it is given (the plain ``optimizer`` or a monitoring
    SafeStep around it); ``options`` are SafeStep keyword options the model needs (``logits_fn``, ``labels_fn``, ...).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_step: Callable[[torch.optim.Optimizer], Any]
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.optimizer, torch.optim.Optimizer) or isinstance(self.optimizer, SafeStep):
            raise ValueError(f"optimizer must be the plain torch optimizer, got {type(self.optimizer).__name__}")
        if not callable(self.train_step):
            raise ValueError("train_step must be a function train_step(optimizer) that takes one optimizer step")
        taken = sorted({"mode", "r", "probe_size", "sinks"} & set(self.options))
        if taken:
            raise ValueError(f"options may not set {', '.join(taken)}: calibrate chooses them")


@dataclass(frozen=True)
class Rule:
    """How the recommendation is read (docs/calibrate.md, "The rule"): **r** is the smallest candidate that would cap
    at most ``max_cap_share`` of the steps (else the largest, with the advice to lower the LR); **probe** is the whole
    batch when on a compared step the default probe's ρ exceeds the whole batch's by more than ``max_overstatement``×
    or when the whole batch costs at most ``cheap_ratio``× the default probe's seconds per step, else the default."""

    max_cap_share: float = 0.05
    max_overstatement: float = 1.5
    cheap_ratio: float = 1.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_cap_share < 1.0:
            raise ValueError(f"max_cap_share must lie in [0, 1), got {self.max_cap_share}")
        for name in ("max_overstatement", "cheap_ratio"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ProbeComparison:
    """One update measured twice: ρ over the default probe's rows and over every row of the batch."""

    step: int
    rho_probe: float
    rho_batch: float
    rows_probed: int
    rows_in_batch: int

    @property
    def overstatement(self) -> float:
        """ρ_probe / ρ_batch (≥ 1: the probed rows are a subset of the batch's); nan when either is not finite."""
        if not (math.isfinite(self.rho_probe) and math.isfinite(self.rho_batch) and self.rho_batch > 0):
            return math.nan
        return self.rho_probe / self.rho_batch


@dataclass(frozen=True)
class Recommendation:
    """The configuration the rule picks and why; ``probe_size`` is meaningful only when ``probe_measured``."""

    r: float
    probe_size: ProbeSize
    probe_measured: bool
    reasons: tuple[str, ...]

    def code(self) -> str:
        """The SafeStep call, e.g. ``SafeStep(optimizer, model, r=1.0)``."""
        probe = f", probe_size={self.probe_size!r}" if self.probe_measured and self.probe_size != DEFAULT_PROBE else ""
        return f"SafeStep(optimizer, model, r={self.r:g}{probe})"


@dataclass(frozen=True)
class Calibration:
    """What a calibration run (or a history) measured, and the recommendation read from it by ``rule``. ``r_probe``:
    r_proposed of every measured step with the default probe (or the history's probe); ``r_batch``: r_proposed of the
    steps measured with the whole batch; ``comparisons``: the steps measured both ways; ``seconds``: median seconds
    per step by configuration (a run: the whole training step; a history: the guarded ``step()`` only);
    ``unmeasured``: steps without a finite r (skipped, or applied unmeasured)."""

    source: str
    r_probe: tuple[float, ...]
    r_batch: tuple[float, ...] = ()
    comparisons: tuple[ProbeComparison, ...] = ()
    seconds: Mapping[str, float] = field(default_factory=dict)
    rows_probed: int = 0
    rows_in_batch: int = 0
    unmeasured: int = 0
    radii: tuple[float, ...] = CANDIDATE_RADII
    rule: Rule = field(default_factory=Rule)
    seconds_kind: str = "training step"

    def quantiles(self, batch: bool = False) -> dict[float, float]:
        """{q: the q-quantile of r_proposed} for q in QUANTILES (nan without samples)."""
        values = sorted(self.r_batch if batch else self.r_probe)
        return {q: _quantile(values, q) for q in QUANTILES}

    def cap_share(self, r: float, batch: bool = False) -> float:
        """The share of measured steps whose proposed step exceeds r radii: those a cap at r would shorten."""
        values = self.r_batch if batch else self.r_probe
        return sum(value > r for value in values) / len(values) if values else math.nan

    @property
    def max_overstatement(self) -> float:
        """The largest ρ_probe/ρ_batch over the compared steps (nan when none was compared)."""
        ratios = [c.overstatement for c in self.comparisons if not math.isnan(c.overstatement)]
        return max(ratios) if ratios else math.nan

    @property
    def median_overstatement(self) -> float:
        """The median ρ_probe/ρ_batch over the compared steps (nan when none was compared)."""
        ratios = [c.overstatement for c in self.comparisons if not math.isnan(c.overstatement)]
        return statistics.median(ratios) if ratios else math.nan

    @property
    def recommendation(self) -> Recommendation:
        """The configuration ``rule`` picks (see ``Rule``)."""
        if not self.r_probe:
            raise ValueError(f"{self.source}: no step with a finite r_proposed to calibrate on")
        probe, measured, reasons = self._probe_choice()
        scale, shares = self._rule_shares(probe, measured)
        fitting = [r for r in sorted(self.radii) if shares[r] <= self.rule.max_cap_share]
        estimated = "" if scale == 1.0 else \
            f", the whole batch's r estimated as r_proposed × {scale:.2f}, the median overstatement"
        if fitting:
            r = fitting[0]
            candidates = "{" + ", ".join(f"{v:g}" for v in self.radii) + "}"
            reasons.insert(0, f"r={r:g}: the smallest of {candidates} that caps at most "
                              f"{self.rule.max_cap_share:.0%} of the steps: {shares[r]:.1%}{estimated}")
        else:
            r = max(self.radii)
            reasons.insert(0, f"r={r:g}: every candidate caps more than {self.rule.max_cap_share:.0%} of the steps "
                              f"(r={r:g}: {shares[r]:.1%}{estimated}); the learning rate proposes steps beyond the "
                              "radius on most steps: consider lowering it (safestep.find_lr)")
        return Recommendation(r, probe, measured, tuple(reasons))

    def rule_shares(self) -> dict[float, float]:
        """{r: the share of steps a cap at r would shorten} as the rule reads it, for the recommended probe."""
        probe, measured, _ = self._probe_choice()
        return self._rule_shares(probe, measured)[1]

    def _rule_shares(self, probe: ProbeSize, measured: bool) -> tuple[float, dict[float, float]]:
        """(the factor applied to r_proposed, the cap share of each candidate r): with the whole batch chosen, each
        step's whole-batch r is estimated as r_proposed × the median overstatement."""
        scale = 1.0
        if measured and probe is None and not math.isnan(self.median_overstatement):
            scale = self.median_overstatement
        count = max(1, len(self.r_probe))
        return scale, {r: sum(v * scale > r for v in self.r_probe) / count for r in self.radii}

    def _probe_choice(self) -> tuple[ProbeSize, bool, list[str]]:
        """(the probe the rule picks, whether the probes were compared, the reasons)."""
        if not self.comparisons:
            covered = f"{self.rows_probed}" + (f" of {self.rows_in_batch}" if self.rows_in_batch else "") + " rows"
            return DEFAULT_PROBE, False, [f"probe: not compared (the source holds one probe per step, {covered}); "
                                          "run calibrate on a training script to compare with the whole batch"]
        worst, limit = self.max_overstatement, self.rule.max_overstatement
        whole, default = self.seconds.get("whole batch"), self.seconds.get("default probe")
        cost = whole / default if whole is not None and default is not None and default > 0 else math.inf
        if worst > limit:
            return None, True, [f"probe_size=None: on a compared step the default probe's ρ was {worst:.2f}× the whole "
                                f"batch's (> {limit:g}×)"]
        if cost <= self.rule.cheap_ratio:
            return None, True, [f"probe_size=None: the whole batch costs {cost:.2f}× the default probe per step "
                                f"(≤ {self.rule.cheap_ratio:g}×), and certifies every row"]
        share = 1 / cost if cost else math.nan
        return DEFAULT_PROBE, True, [f"probe_size={DEFAULT_PROBE!r} (the default): its ρ stayed within {worst:.2f}× "
                                     f"of the whole batch's (≤ {limit:g}×), at {share:.2f}× the whole batch's cost"]

    def summary(self) -> str:
        """A plain-text report: quantiles, cap shares, the probe comparison, seconds per step, the recommendation."""
        lines = [f"calibration of {self.source}: {len(self.r_probe)} measured steps"
                 + (f" ({self.unmeasured} without a finite r)" if self.unmeasured else "")
                 + (f", probe {self.rows_probed} of {self.rows_in_batch} batch rows" if self.rows_in_batch else ""),
                 ""]
        labels = ("max" if q == 1.0 else f"p{q * 100:g}" for q in QUANTILES)
        lines.append("r_proposed quantiles    " + "  ".join(f"{label:>7}" for label in labels))
        rows = [("default probe", False)] + ([("whole batch", True)] if self.r_batch else [])
        for label, batch in rows:
            values = "  ".join(f"{v:7.3g}" for v in self.quantiles(batch).values())
            count = len(self.r_batch if batch else self.r_probe)
            lines.append(f"  {label:<21} {values}   (n={count})")
        lines += ["", "share of steps a cap at r would shorten   " + "  ".join(f"r={r:<5g}" for r in self.radii)]
        for label, batch in rows:
            lines.append(f"  {label:<39} " + "  ".join(f"{self.cap_share(r, batch):7.1%}" for r in self.radii))
        if self.comparisons:
            lines += ["", "default probe vs whole batch on the same update (ρ_probe / ρ_batch):"]
            lines += [f"  step {c.step:>5}: ρ_probe {c.rho_probe:.4g}, ρ_batch {c.rho_batch:.4g} -> "
                      f"{c.overstatement:.3f}x  ({c.rows_probed} of {c.rows_in_batch} rows)" for c in self.comparisons]
            lines.append(f"  median {self.median_overstatement:.3f}x, max {self.max_overstatement:.3f}x")
        if self.seconds:
            lines += ["", f"seconds per {self.seconds_kind} (median):"]
            base = self.seconds.get("plain")
            for name, seconds in self.seconds.items():
                relative = f"  ({seconds / base:.2f}x plain)" if base and name != "plain" else ""
                lines.append(f"  {name:<21} {seconds * 1e3:9.2f} ms{relative}")
        recommendation = self.recommendation
        lines += ["", f"recommendation: {recommendation.code()}"] + [f"  - {why}" for why in recommendation.reasons]
        return "\n".join(lines)

    def figure(self) -> Figure:
        """One standalone Figure (no pyplot): the share of steps above each r (the cap share, candidates marked),
        ρ_probe/ρ_batch per compared step, and seconds per step by configuration. Needs matplotlib."""
        figure = _standalone_figure(figsize=(13, 4.2), layout="constrained")
        share_ax, ratio_ax, time_ax = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1.4, 1, 1]})
        recommendation = self.recommendation
        self._draw_shares(share_ax, recommendation)
        self._draw_ratios(ratio_ax)
        self._draw_seconds(time_ax)
        figure.suptitle(f"safestep calibrate: {self.source} -> {recommendation.code()}")
        return figure

    def _draw_shares(self, ax: Any, recommendation: Recommendation) -> None:
        for label, values in (("default probe", self.r_probe), ("whole batch", self.r_batch)):
            positive = sorted(v for v in values if v > 0)
            if not positive:
                continue
            share = [(len(positive) - i - 1) / len(values) for i in range(len(positive))]
            ax.step(positive, share, where="post", label=f"{label} (n={len(values)})")
        shares = self.rule_shares()
        for r in self.radii:
            chosen = r == recommendation.r
            ax.axvline(r, color="tab:red" if chosen else "0.4", linestyle="-" if chosen else ":", linewidth=1.2)
            ax.text(r, 0.98, f"r={r:g}: {shares[r]:.1%}" + (" (chosen)" if chosen else ""), rotation=90,
                    ha="right", va="top", fontsize="small", transform=ax.get_xaxis_transform())
        ax.axhline(self.rule.max_cap_share, color="0.5", linestyle="--", linewidth=0.8,
                   label=f"rule: at most {self.rule.max_cap_share:.0%} capped")
        ax.set(xscale="log", xlabel="r = τ/ρ (proposed step in radius units)",
               ylabel="share of steps with r_proposed > r", title="how often a cap at r would fire")
        ax.legend(fontsize="small")

    def _draw_ratios(self, ax: Any) -> None:
        if not self.comparisons:
            ax.text(0.5, 0.5, "not compared\n(a history holds one probe per step)", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            return
        ax.plot([c.step for c in self.comparisons], [c.overstatement for c in self.comparisons], "o-")
        ax.axhline(1.0, color="0.6", linewidth=0.8)
        ax.axhline(self.rule.max_overstatement, color="tab:red", linestyle="--", linewidth=0.8,
                   label=f"rule: whole batch above {self.rule.max_overstatement:g}x")
        ax.set(xlabel="step", ylabel="ρ default probe / ρ whole batch", title="what the default probe overstates")
        ax.legend(fontsize="small")

    def _draw_seconds(self, ax: Any) -> None:
        names = list(self.seconds)
        ax.bar(names, [self.seconds[name] * 1e3 for name in names], color="tab:gray")
        ax.set(ylabel=f"ms per {self.seconds_kind} (median)", title="cost of each configuration")
        ax.tick_params(axis="x", labelsize="small")


def calibrate(target: CalibrationTarget | Callable[[], Any], *, steps: int = 100, compare: int = 5,
              timing_steps: int = 5, radii: Sequence[float] = CANDIDATE_RADII, rule: Rule | None = None,
              progress: Progress | None = None) -> Calibration:
    """Calibrate r and the probe on ``2·timing_steps + 2 + steps`` ordinary training steps of ``target`` (a
    CalibrationTarget, or a function returning one): plain, monitored with the default probe (``compare`` of them also
    with the whole batch, along the same update) and with the whole-batch probe (docs/calibrate.md). Monitor mode
    never changes an update: the model and optimizer are left trained by those steps; the guards' forward hooks and
    parameter-group keys are removed."""
    for name, value, low in (("steps", steps, 1), ("compare", compare, 0), ("timing_steps", timing_steps, 1)):
        _check_int(name, value, low)
    if compare >= steps:
        raise ValueError(f"compare ({compare}) must be smaller than steps ({steps}): the first step is never compared")
    radii = _checked_radii(radii)
    target = _as_target(target() if callable(target) else target)  # a CalibrationTarget is not callable
    run = _Run(target, progress)
    keys = [set(group) for group in target.optimizer.param_groups]
    try:
        plain = run.timed("plain", timing_steps, target.optimizer)
        default_seconds, probe_reports, comparisons = run.monitored(steps, compare)
        batch_seconds, batch_reports = run.whole_batch(timing_steps)
    finally:
        for group, known in zip(target.optimizer.param_groups, keys):
            for key in set(group) - known:
                del group[key]
    r_probe, unmeasured = _finite_r(probe_reports)
    r_batch, _ = _finite_r(batch_reports + run.batch_reports)
    last = probe_reports[-1]
    source = f"{type(target.model).__name__} with {type(target.optimizer).__name__}"
    seconds = {"plain": plain, "default probe": default_seconds, "whole batch": batch_seconds}
    return Calibration(source=source, r_probe=r_probe, r_batch=r_batch, comparisons=tuple(comparisons), seconds=seconds,
                       rows_probed=last.rows_probed, rows_in_batch=last.rows_in_batch, unmeasured=unmeasured,
                       radii=radii, rule=rule or Rule())


def calibrate_history(history: str | Path | Iterable[StepReport], *, radii: Sequence[float] = CANDIDATE_RADII,
                      rule: Rule | None = None) -> Calibration:
    """Calibrate r from a history of step reports (a CSV or JSON-lines file, or the reports themselves): one probe
    per step, so the probe is not compared; its seconds are the guarded ``step()``'s (``StepReport.seconds``), without
    the forward and backward."""
    radii = _checked_radii(radii)
    if isinstance(history, (str, Path)):
        source, reports = Path(history).name, read_reports(history)
    else:
        source, reports = "history", list(history)
    if not reports:
        raise ValueError(f"{source} holds no step reports")
    r_probe, unmeasured = _finite_r(reports)
    seconds = [report.seconds for report in reports[1:] or reports]  # the first step includes the preflight
    rows = statistics.median_low([report.rows_probed for report in reports])
    batch = statistics.median_low([report.rows_in_batch for report in reports])
    label = "whole batch" if batch and rows >= batch else "guarded step"
    return Calibration(source=source, r_probe=r_probe, seconds={label: statistics.median(seconds)}, rows_probed=rows,
                       rows_in_batch=batch, unmeasured=unmeasured, radii=radii, rule=rule or Rule(),
                       seconds_kind="guarded step() (from the history)")


def load_target(spec: str) -> Callable[[], Any]:
    """The entry point named by ``"path/to/script.py:function"`` or ``"package.module:function"``; a script is run
    with ``__name__ == "__safestep_calibrate__"``, so its ``if __name__ == "__main__":`` block (the training itself)
    does not run. Raises ValueError with what went wrong."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"expected SCRIPT.py:FUNCTION or MODULE:FUNCTION, got {spec!r}")
    if where.endswith(".py"):
        if not Path(where).is_file():
            raise ValueError(f"no such script: {where}")
        namespace = runpy.run_path(where, run_name="__safestep_calibrate__")
    else:
        try:
            namespace = vars(importlib.import_module(where))
        except ModuleNotFoundError as error:
            raise ValueError(f"cannot import {where}: {error}") from None
    entry = namespace.get(name)
    if not callable(entry):
        raise ValueError(f"{where} defines no function {name}")
    return entry


class _Relay(torch.optim.Optimizer):
    """An optimizer whose ``step()`` is a default-probe guard's step, so that a whole-batch guard wrapped around it
    measures the very update the default guard measured. Its parameter groups are copies (same tensors), so the
    outer guard's counters stay out of the user's optimizer."""

    _step_supports_amp_scaling = False

    def __init__(self, guard: SafeStep) -> None:
        self.guard = guard
        self.param_groups = [{k: v for k, v in group.items() if not k.startswith("safestep_")}
                             for group in guard.param_groups]
        self.state = guard.state
        self.defaults = dict(guard.defaults)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """The inner guard's step."""
        return self.guard.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner guard's zero_grad."""
        self.guard.zero_grad(set_to_none)


class _Run:
    """The three phases of a calibration run, each a number of ``train_step`` calls on one optimizer."""

    def __init__(self, target: CalibrationTarget, progress: Progress | None) -> None:
        self.target = target
        self.progress = progress
        self.batch_reports: list[StepReport] = []

    @contextmanager
    def guard(self, optimizer: torch.optim.Optimizer, probe_size: ProbeSize) -> Iterator[SafeStep]:
        """A monitoring SafeStep; its forward hooks are removed on leaving, so it costs the other phases nothing."""
        guard = SafeStep(optimizer, self.target.model, mode="monitor", probe_size=probe_size, history=None,
                         **dict(self.target.options))
        try:
            yield guard
        finally:
            if guard.capture is not None:
                guard.capture.remove()

    def _step(self, optimizer: torch.optim.Optimizer, phase: str, done: int, total: int) -> float:
        """Seconds of one ``train_step``; with a guard, checks that the step stepped it exactly once."""
        before = optimizer.steps if isinstance(optimizer, SafeStep) else None
        start = time.perf_counter()
        self.target.train_step(optimizer)
        seconds = time.perf_counter() - start
        if before is not None and optimizer.steps != before + 1:
            raise ValueError(f"train_step must call optimizer.step() once on the optimizer it is given; it stepped "
                             f"it {optimizer.steps - before} times")
        if self.progress is not None:
            self.progress(phase, done + 1, total)
        return seconds

    def timed(self, phase: str, count: int, optimizer: torch.optim.Optimizer) -> float:
        """Median seconds per step over ``count`` steps (after one untimed step: warm-up, the guard's preflight)."""
        self._step(optimizer, phase, 0, count + 1)
        return statistics.median(self._step(optimizer, phase, i, count + 1) for i in range(1, count + 1))

    def monitored(self, steps: int, compare: int) -> tuple[float, list[StepReport], list[ProbeComparison]]:
        """``steps`` steps with the default probe; ``compare`` of them also with the whole batch (untimed)."""
        chosen = {round(1 + i * (steps - 1) / compare) for i in range(compare)} if compare else set()
        seconds, reports, comparisons = [], [], []
        with self.guard(self.target.optimizer, DEFAULT_PROBE) as guard:
            for i in range(steps):
                if i in chosen:
                    with self.guard(_Relay(guard), None) as outer:
                        self._step(outer, "default probe vs whole batch", i, steps)
                    inner, whole = guard.last_report, outer.last_report
                    comparisons.append(ProbeComparison(inner.step, inner.rho, whole.rho, inner.rows_probed,
                                                       whole.rows_probed))
                    self.batch_reports.append(whole)
                else:
                    elapsed = self._step(guard, "default probe", i, steps)
                    if i > 0:
                        seconds.append(elapsed)
                reports.append(guard.last_report)
        return (statistics.median(seconds) if seconds else math.nan), reports, comparisons

    def whole_batch(self, count: int) -> tuple[float, list[StepReport]]:
        """Seconds per step and reports of ``count`` steps probing the whole batch (after one untimed step)."""
        with self.guard(self.target.optimizer, None) as guard:
            return self.timed("whole batch", count, guard), list(guard.history)


def _as_target(value: Any) -> CalibrationTarget:
    """A CalibrationTarget from what an entry point returned: a target, or (model, optimizer, train_step[, options])."""
    if isinstance(value, CalibrationTarget):
        return value
    if isinstance(value, tuple) and len(value) in (3, 4):
        return CalibrationTarget(*value)
    raise ValueError("the entry point must return a CalibrationTarget(model, optimizer, train_step, options) or a "
                     f"(model, optimizer, train_step[, options]) tuple, got {type(value).__name__}")


def _checked_radii(radii: Sequence[float]) -> tuple[float, ...]:
    values = tuple(radii)
    if not values or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0
                             for r in values):
        raise ValueError(f"radii must be finite positive numbers, got {radii!r}")
    return tuple(sorted(float(r) for r in values))


def _finite_r(reports: Sequence[StepReport]) -> tuple[tuple[float, ...], int]:
    """(r_proposed of the measured steps, the number of steps without a finite r)."""
    finite = tuple(report.r_proposed for report in reports
                   if not report.skipped and math.isfinite(report.r_proposed))
    return finite, len(reports) - len(finite)


def _quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values (linear interpolation; nan when empty)."""
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

