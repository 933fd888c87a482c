"""Hugging Face Transformers: SafeStep around a ``Trainer``'s own optimizer and its statistics in the Trainer's logs.

``add_safestep(trainer)`` wraps the optimizer the Trainer builds from its ``TrainingArguments`` (its ``optim=``
choice and weight-decay parameter groups) and registers ``SafeStepTrainerCallback`` first. accelerate wraps the
guard in an AcceleratedOptimizer whose ``step()`` calls ``SafeStep.step()`` with no closure (through
``GradScaler.step`` under fp16), on the optimizer steps only (gradient accumulation steps in between are not
seen); the Trainer calls ``model(**batch)`` with ``labels`` in the batch, which SafeStep's forward pre-hook
captures as a dict: ``hf_logits_fn`` takes the logits without computing a loss and ``labels_fn_for(model)``
gives one label per logits row (shifted by one position for causal LMs).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..bounds import IGNORE_INDEX
from ..guard import SafeStep
from ..probe import CallArgs, Inputs, call_model, extract_logits
from . import DEFAULT_PREFIX, interval_metrics, reports_after, unwrap_safestep

__all__ = ["add_safestep", "SafeStepTrainerCallback", "add_safestep_callback", "hf_logits_fn", "labels_fn_for",
           "sequence_labels", "causal_lm_labels", "without_label_keys", "NON_INPUT_KEYS"]

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


def sequence_labels(batch: Inputs) -> Tensor | None:
    """``batch["labels"]`` as they are: one class index per logits row (sequence or token classification, masked LM,
    encoder-decoder LMs); None when the batch holds no integer labels (regression, multi-label, labels a label
    smoother popped), and the bound then runs without labels."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, Tensor) or labels.is_floating_point():
        return None
    return labels


def causal_lm_labels(batch: Inputs) -> Tensor | None:
    """The label of each logits row of a causal LM, which shifts ``labels`` inside the model: logits row (b, t) is
    scored against labels[b, t + 1], and the last position against nothing (IGNORE_INDEX, -100). A
    ``shift_labels`` entry in the batch (already shifted, as HF's context-parallel collators make) is used as is."""
    if isinstance(batch, Mapping) and isinstance(batch.get("shift_labels"), Tensor):
        return batch["shift_labels"]
    labels = sequence_labels(batch)
    return None if labels is None else F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def labels_fn_for(model: nn.Module) -> Callable[[Inputs], Tensor | None]:
    """``causal_lm_labels`` for a causal LM (a class ``AutoModelForCausalLM`` builds, or ``loss_type`` "ForCausalLM"),
    ``sequence_labels`` for every other model. Wrapped models (PEFT, ...) count as non-causal: pass ``labels_fn``."""
    causal = (type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
              or getattr(model, "loss_type", None) == "ForCausalLM")
    return causal_lm_labels if causal else sequence_labels


class SafeStepTrainerCallback(transformers.TrainerCallback):
    """Add the guard's statistics since the previous log to every training log of a ``Trainer``.

    Keys (``prefix`` + name): tau, rho, r_proposed = τ/ρ, scale, r_applied = s·τ/ρ, capped, skipped of the latest
    step, and over the logging interval r_applied_max, capped_fraction, skipped_fraction and steps. They are
    also written into the matching ``state.log_history`` entry. Reporting integrations (``report_to``) run
    before callbacks passed to ``Trainer(callbacks=...)``: ``add_safestep`` and ``add_safestep_callback`` insert
    it first, so that they see the keys.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self._guard: SafeStep | None = None
        self._last_step = -1

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Find the SafeStep inside the Trainer's (accelerate-wrapped) optimizer."""
        self._guard = unwrap_safestep(optimizer)
        if self._guard is None:
            raise ValueError("SafeStepTrainerCallback found no SafeStep optimizer: call add_safestep(trainer) "
                             "or pass Trainer(optimizers=(SafeStep(optimizer, model), scheduler))")
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


def add_safestep(trainer: transformers.Trainer, *, prefix: str = DEFAULT_PREFIX, **safestep_options: Any) -> SafeStep:
    """Guard the Trainer's own optimizer with SafeStep and log the guard's statistics; returns the guard.

    The optimizer is ``trainer.optimizer`` when the Trainer was given one, otherwise the one
    ``trainer.create_optimizer()`` builds from the ``TrainingArguments``: the ``optim=`` choice, its learning rate
    and betas, and its parameter groups (``weight_decay`` on weights, 0 on biases and norm weights). The Trainer's
    scheduler drives the guard's learning rate (the guard shares the optimizer's param_groups; a scheduler the
    Trainer builds in ``train()`` is built on the guard). ``logits_fn`` defaults to ``hf_logits_fn`` and
    ``labels_fn`` to ``labels_fn_for(trainer.model)``; every keyword goes to ``SafeStep``. The logging callback is
    inserted first (``add_safestep_callback(trainer, prefix)``), so reporters (``report_to``) see its keys.
    DeepSpeed and FSDP Trainers, which build or shard the optimizer inside ``train()``, and ``model_init``, which
    rebuilds model and optimizer there, are refused.
    """
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.is_fsdp_xla_enabled:
        raise ValueError("add_safestep does not support DeepSpeed or FSDP Trainers: they create or shard the optimizer "
                         "inside train(), after the guard would have wrapped it")
    if trainer.model_init is not None:
        raise ValueError("add_safestep does not support Trainer(model_init=...): train() builds a new model and "
                         "optimizer, and the guard would be dropped")
    if unwrap_safestep(trainer.optimizer) is not None:
        raise ValueError("the Trainer's optimizer is already a SafeStep; add_safestep_callback(trainer) adds the logging")
    optimizer = trainer.optimizer if trainer.optimizer is not None else trainer.create_optimizer()
    safestep_options.setdefault("logits_fn", hf_logits_fn)
    safestep_options.setdefault("labels_fn", labels_fn_for(trainer.model))
    guard = SafeStep(optimizer, trainer.model, **safestep_options)
    trainer.optimizer = guard
    add_safestep_callback(trainer, prefix)
    return guard


def add_safestep_callback(trainer: transformers.Trainer, prefix: str = DEFAULT_PREFIX) -> SafeStepTrainerCallback:
    """Insert a SafeStepTrainerCallback first in the trainer's callbacks (so reporters see its keys); returns it."""
    callback = SafeStepTrainerCallback(prefix)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
