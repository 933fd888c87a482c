"""Framework integrations (Lightning, Hugging Face, Accelerate): shared, framework-free helpers.

The framework modules ``safestep.integrations.lightning`` and ``safestep.integrations.transformers`` import
their framework at import time; this package itself imports neither, so ``import safestep`` never does.
Accelerate needs no module: wrap the optimizer before ``accelerator.prepare``, reach the guard through the
AcceleratedOptimizer with ``unwrap_safestep`` and log with ``telemetry.CallbackSink(accelerator.log)``.
Every metric is derived from a ``StepReport`` (``report_metrics``, defined in ``safestep.telemetry``): τ, ρ,
r_proposed = τ/ρ (the inner optimizer's step in radius units, before scaling), s, and r_applied = s·τ/ρ (the step
actually applied, in radius units; at most the guard's r in cap mode).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..guard import SafeStep
from ..telemetry import DEFAULT_PREFIX, StepReport, report_metrics

__all__ = ["DEFAULT_PREFIX", "unwrap_safestep", "report_metrics", "interval_metrics", "reports_after"]

_MAX_WRAPPER_DEPTH = 8


def unwrap_safestep(optimizer: Any) -> SafeStep | None:
    """The SafeStep inside framework wrappers (Lightning's LightningOptimizer, accelerate's AcceleratedOptimizer), or None.

    LightningOptimizer keeps the wrapped optimizer in ``_optimizer`` and fakes its class (it passes
    ``isinstance(·, SafeStep)``), so ``_optimizer`` is followed first; other wrappers expose ``.optimizer``.
    """
    for _ in range(_MAX_WRAPPER_DEPTH):
        if optimizer is None:
            return None
        wrapped = vars(optimizer).get("_optimizer") if hasattr(optimizer, "__dict__") else None
        if wrapped is not None:
            optimizer = wrapped
        elif isinstance(optimizer, SafeStep):
            return optimizer
        else:
            optimizer = getattr(optimizer, "optimizer", None)
    return None


def interval_metrics(reports: Sequence[StepReport], prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """The last report's metrics plus, over the interval, max r_applied, capped and skipped fractions and the step count."""
    if not reports:
        raise ValueError("interval_metrics needs at least one report")
    metrics = report_metrics(reports[-1], prefix)
    per_step = [report_metrics(report, prefix) for report in reports]
    count = len(reports)
    metrics[prefix + "r_applied_max"] = max(m[prefix + "r_applied"] for m in per_step)
    metrics[prefix + "capped_fraction"] = sum(m[prefix + "capped"] for m in per_step) / count
    metrics[prefix + "skipped_fraction"] = sum(m[prefix + "skipped"] for m in per_step) / count
    metrics[prefix + "steps"] = float(count)
    return metrics


def reports_after(guard: SafeStep, step: int) -> list[StepReport]:
    """The guard's stored reports whose step index is greater than ``step``, oldest first."""
    newer: list[StepReport] = []
    for report in reversed(guard.history):
        if report.step <= step:
            break
        newer.append(report)
    return newer[::-1]
