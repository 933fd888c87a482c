"""Is a run frozen? ``FREEZE_STEPS`` steps in a row applied at scale s < ``FREEZE_SCALE``, compared with the steps
before them: a collapsed radius is warned once, long proposals being capped are only reported (docs/step.md)."""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from .telemetry import StepReport

__all__ = ["FREEZE_SCALE", "FREEZE_STEPS", "FreezeWatch", "Verdict"]

FREEZE_SCALE = 0.1  # an applied scale below this ...
FREEZE_STEPS = 50  # ... for this many consecutive steps is a streak worth a word


@dataclass(frozen=True)
class Verdict:
    """What a streak means: ``note`` for the report's reason, ``warning`` text (empty: no warning)."""

    note: str = ""
    warning: str = ""


@dataclass
class FreezeWatch:
    """Counts the current streak of small steps and keeps (ρ, τ) of the steps before it and within it."""

    streak: int = 0
    warned: bool = False
    before: deque = field(default_factory=lambda: deque(maxlen=FREEZE_STEPS))
    during: deque = field(default_factory=lambda: deque(maxlen=FREEZE_STEPS))

    def peek(self, report: StepReport) -> Verdict:
        """The verdict ``report`` would get, without recording it (a step may still be rolled back)."""
        return self._judge(report, self._streak_with(report))

    def record(self, report: StepReport) -> Verdict:
        """Record a committed step; the verdict's warning is non-empty once per run, when a collapse is first seen."""
        streak = self._streak_with(report)
        verdict = self._judge(report, streak)
        if streak == 0:
            if self.during:
                self.before.clear()
            self.during.clear()
            if not report.skipped and math.isfinite(report.rho) and report.tau > 0:
                self.before.append((report.rho, report.tau))
        else:
            self.during.append((report.rho, report.tau))
        self.streak = streak
        if verdict.warning and not self.warned:
            self.warned = True
            return verdict
        return Verdict(verdict.note)

    def _streak_with(self, report: StepReport) -> int:
        small = not report.skipped and report.scale < FREEZE_SCALE
        return self.streak + 1 if small else 0

    def _judge(self, report: StepReport, streak: int) -> Verdict:
        if streak < FREEZE_STEPS:
            return Verdict()
        rows = [*self.during, (report.rho, report.tau)][-FREEZE_STEPS:]
        rho_now, tau_now = statistics.median(r for r, _ in rows), statistics.median(t for _, t in rows)
        summary = f"scale < {FREEZE_SCALE} for {streak} steps, set by the {report.bound} bound"
        if not self.before:
            text = (f"frozen: {summary} (median rho {rho_now:.3g}, median tau {tau_now:.3g}, no earlier steps to "
                    "compare)")
            return Verdict(text, text)
        rho_then, tau_then = statistics.median(r for r, _ in self.before), statistics.median(t for _, t in self.before)
        if rho_now < FREEZE_SCALE * rho_then:
            text = f"frozen: {summary}; the radius collapsed (median rho {rho_then:.3g} before, {rho_now:.3g} now)"
            return Verdict(text, text)
        if tau_now > tau_then / FREEZE_SCALE:
            return Verdict(f"capping long proposals: {summary}; the proposals grew {tau_now / tau_then:.3g}x (median "
                           f"tau {tau_then:.3g} before, {tau_now:.3g} now) while rho held ({rho_then:.3g} -> "
                           f"{rho_now:.3g})")
        text = (f"frozen: {summary} (median rho {rho_then:.3g} -> {rho_now:.3g}, median tau {tau_then:.3g} -> "
                f"{tau_now:.3g})")
        return Verdict(text, text)
