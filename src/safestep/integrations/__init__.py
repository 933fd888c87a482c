"""Framework integrations: the shared, framework-free helpers (recipes per framework: docs/integrations.md).

Each framework module (``.lightning``, ``.transformers``, ``.olmo_core``, ``.deepspeed``) imports its framework;
this package imports none, so ``import safestep`` never does. Accelerate needs no module of its own.
"""
from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..guard import SafeStep
from ..probe import CallArgs, Inputs
from ..telemetry import DEFAULT_PREFIX, StepReport, report_metrics

__all__ = ["DEFAULT_PREFIX", "unwrap_safestep", "seat_safestep", "without_keys", "report_metrics",
           "interval_metrics", "reports_after"]

_MAX_WRAPPER_DEPTH = 8


def unwrap_safestep(optimizer: Any) -> SafeStep | None:
    """The SafeStep inside framework wrappers (LightningOptimizer, accelerate's AcceleratedOptimizer), or None.
    LightningOptimizer fakes its class (it passes ``isinstance(·, SafeStep)``), so its ``_optimizer`` goes first."""
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


def without_keys(inputs: Inputs, keys: Collection[str]) -> Inputs:
    """A captured call (or keyword dict) without the keyword arguments named in ``keys`` (positional ones are kept):
    the framework's call minus its labels and loss options, which returns the logits instead of a loss."""
    if isinstance(inputs, CallArgs):
        return CallArgs(inputs.args, {k: v for k, v in inputs.kwargs.items() if k not in keys})
    if isinstance(inputs, Mapping):
        return {k: v for k, v in inputs.items() if k not in keys}
    return inputs


def seat_safestep(accelerated: Any, model: nn.Module, **safestep_options: Any) -> SafeStep:
    """Put a SafeStep between an already prepared AcceleratedOptimizer and the optimizer it wraps; returns the guard.

    For FSDP2, where ``prepare`` shards the model: the guard is built on the prepared ``model`` and seated *inside*
    the AcceleratedOptimizer, which keeps gating ``step()`` on the accumulation cycle (and unscaling under a
    GradScaler). Every keyword goes to ``SafeStep``.
    """
    inner = getattr(accelerated, "optimizer", None)
    if type(accelerated).__name__ != "AcceleratedOptimizer" or not isinstance(inner, torch.optim.Optimizer):
        raise ValueError(f"seat_safestep needs the AcceleratedOptimizer that accelerator.prepare returned, "
                         f"got {type(accelerated).__name__}")
    if unwrap_safestep(accelerated) is not None:
        raise ValueError("this AcceleratedOptimizer already holds a SafeStep")
    guard = SafeStep(inner, model, **safestep_options)
    state = accelerated.__getstate__()  # accelerate re-derives its GradScaler step patch from .optimizer on setstate
    state["optimizer"] = guard
    accelerated.__setstate__(state)
    return guard


def interval_metrics(reports: Sequence[StepReport], prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """The last report's metrics plus, over the interval, max r_applied, capped and skipped fractions, step count."""
    if not reports:
        raise ValueError("interval_metrics needs at least one report")
    count = len(reports)
    return {**report_metrics(reports[-1], prefix),
            prefix + "r_applied_max": max(float(report.r_applied) for report in reports),
            prefix + "capped_fraction": sum(report.capped for report in reports) / count,
            prefix + "skipped_fraction": sum(report.skipped for report in reports) / count,
            prefix + "steps": float(count)}


def reports_after(guard: SafeStep, step: int) -> list[StepReport]:
    """The guard's stored reports whose step index is greater than ``step``, oldest first."""
    return list(itertools.takewhile(lambda report: report.step > step, reversed(guard.history)))[::-1]
