"""Hugging Face Transformers: SafeStep inside ``Trainer`` and its statistics in the Trainer's logs.

Pass ``Trainer(..., optimizers=(SafeStep(inner, model, logits_fn=hf_logits_fn), scheduler_or_None))``.
accelerate wraps the optimizer in an AcceleratedOptimizer whose ``step()`` calls ``SafeStep.step()`` with no
closure (through ``GradScaler.step`` under fp16); the Trainer calls ``model(**batch)`` with ``labels`` in the
batch, which SafeStep's forward pre-hook captures as a dict. ``SafeStepTrainerCallback`` adds the guard's
statistics to every training log.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import transformers
from torch import Tensor, nn

from ..guard import SafeStep
from ..probe import CallArgs, Inputs, call_model, extract_logits
from . import DEFAULT_PREFIX, interval_metrics, reports_after, unwrap_safestep

__all__ = ["SafeStepTrainerCallback", "hf_logits_fn", "without_label_keys", "add_safestep_callback", "NON_INPUT_KEYS"]

NON_INPUT_KEYS = ("labels", "label", "label_ids", "return_loss", "num_items_in_batch")


def without_label_keys(inputs: Inputs) -> Inputs:
    """The inputs with the keyword arguments named in ``NON_INPUT_KEYS`` removed (positional ones are kept)."""
    if isinstance(inputs, CallArgs):
        return CallArgs(inputs.args, {k: v for k, v in inputs.kwargs.items() if k not in NON_INPUT_KEYS})
    if isinstance(inputs, Mapping):
        return {k: v for k, v in inputs.items() if k not in NON_INPUT_KEYS}
    return inputs


def hf_logits_fn(model: nn.Module, inputs: Inputs) -> Tensor:
    """z = model(**inputs minus label/loss keys).logits: keys in ``NON_INPUT_KEYS`` are dropped, so no loss is computed.

    Dropout (including HF attention dropout read from a layer's ``training`` flag) is switched off by the probe
    itself, which evaluates the model's deterministic self.
    """
    return extract_logits(call_model(model, without_label_keys(inputs)))


class SafeStepTrainerCallback(transformers.TrainerCallback):
    """Add the guard's statistics since the previous log to every training log of a ``Trainer``.

    Keys (``prefix`` + name): tau, rho, r = τ/ρ, scale, r_applied = s·τ/ρ, capped, skipped of the latest
    step, and over the logging interval r_applied_max, capped_fraction, skipped_fraction and steps. They are
    also written into the matching ``state.log_history`` entry. Reporting integrations (``report_to``) run
    before callbacks passed to ``Trainer(callbacks=...)``: use ``add_safestep_callback(trainer)`` for them
    to see the keys.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self._guard: SafeStep | None = None
        self._last_step = -1

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Find the SafeStep inside the Trainer's (accelerate-wrapped) optimizer."""
        self._guard = unwrap_safestep(optimizer)
        if self._guard is None:
            raise ValueError("SafeStepTrainerCallback found no SafeStep optimizer: pass "
                             "Trainer(optimizers=(SafeStep(optimizer, model), scheduler))")
        self._last_step = self._guard.steps - 1

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Add the interval's metrics to ``logs`` (and to the log_history entry of this step)."""
        if self._guard is None or logs is None:
            return
        reports = reports_after(self._guard, self._last_step)
        if not reports:
            return
        self._last_step = reports[-1].step
        metrics = interval_metrics(reports, self.prefix)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)


def add_safestep_callback(trainer: transformers.Trainer, prefix: str = DEFAULT_PREFIX) -> SafeStepTrainerCallback:
    """Insert a SafeStepTrainerCallback first in the trainer's callbacks (so reporters see its keys); returns it."""
    callback = SafeStepTrainerCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
