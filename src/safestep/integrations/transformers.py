"""Hugging Face Transformers: SafeStep around a ``Trainer``'s own optimizer and its statistics in the Trainer's logs.

The Trainer calls ``model(**batch)`` with ``labels`` in the batch: ``hf_logits_fn`` takes the logits without a loss
and ``labels_fn_for(model)`` gives one label per logits row. Recipe: docs/integrations.md, "Hugging Face Trainer".
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
from ..probe import Inputs, call_model, extract_logits
from . import DEFAULT_PREFIX, interval_metrics, reports_after, seat_safestep, unwrap_safestep, without_keys

__all__ = ["add_safestep", "SafeStepTrainerCallback", "add_safestep_callback", "hf_logits_fn", "labels_fn_for",
           "sequence_labels", "causal_lm_labels", "without_label_keys", "NON_INPUT_KEYS"]

NON_INPUT_KEYS = ("labels", "label", "label_ids", "return_loss", "num_items_in_batch")


def without_label_keys(inputs: Inputs) -> Inputs:
    """The inputs with the keyword arguments named in ``NON_INPUT_KEYS`` removed (positional ones are kept)."""
    return without_keys(inputs, NON_INPUT_KEYS)


def hf_logits_fn(model: nn.Module, inputs: Inputs) -> Tensor:
    """z = model(**inputs minus ``NON_INPUT_KEYS``).logits: no loss is computed (the probe turns dropout off)."""
    return extract_logits(call_model(model, without_label_keys(inputs)))


def sequence_labels(batch: Inputs) -> Tensor | None:
    """``batch["labels"]`` as they are: one class index per logits row (sequence or token classification, masked LM,
    encoder-decoder LMs); None when the batch holds no integer labels (regression, multi-label, labels a label
    smoother popped), and the bound then runs without labels."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    return labels if isinstance(labels, Tensor) and not labels.is_floating_point() else None


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
    """Add the guard's statistics since the previous log (``interval_metrics``) to every training log of a
    ``Trainer`` and to the matching ``state.log_history`` entry; inserted first, so reporters see the keys."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, seat: dict[str, Any] | None = None) -> None:
        self.prefix = prefix
        self.seat = seat
        self._guard: SafeStep | None = None
        self._last_step = -1

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Find the SafeStep inside the Trainer's (accelerate-wrapped) optimizer; with ``seat`` (SafeStep's options,
        an FSDP2 Trainer) first build it on the sharded model and seat it inside the AcceleratedOptimizer."""
        if self.seat is not None and unwrap_safestep(optimizer) is None:
            seat_safestep(optimizer, model, **self.seat)
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


def add_safestep(trainer: transformers.Trainer, *, prefix: str = DEFAULT_PREFIX,
                 **safestep_options: Any) -> SafeStep | None:
    """Guard the Trainer's own optimizer with SafeStep and log the guard's statistics; returns the guard.

    The optimizer is ``trainer.optimizer``, else the one ``trainer.create_optimizer()`` builds from the
    ``TrainingArguments``. ``logits_fn`` defaults to ``hf_logits_fn`` and ``labels_fn`` to
    ``labels_fn_for(trainer.model)``; every keyword goes to ``SafeStep``. An FSDP2 Trainer shards the model inside
    ``train()``: the callback then builds and seats the guard there, and this returns None. Raises ValueError for
    DeepSpeed, FSDP1, XLA FSDP, ``model_init`` and an optimizer that is already a SafeStep (docs/integrations.md).
    """
    if trainer.is_deepspeed_enabled:
        raise ValueError("add_safestep does not support DeepSpeed Trainers: the DeepSpeed engine steps its own ZeRO "
                         "optimizer on flattened fp32 partitions, which no torch optimizer wrapper can reach; use "
                         "FSDP2 (fsdp='full_shard') for sharded training with SafeStep (docs/integrations.md)")
    if trainer.is_fsdp_xla_enabled or (trainer.is_fsdp_enabled and _fsdp_version(trainer) != 2):
        raise ValueError("add_safestep supports FSDP2 only: set TrainingArguments(fsdp_config={'version': 2}) "
                         "(FSDP1 and XLA FSDP keep flattened parameters the probe cannot perturb)")
    if trainer.model_init is not None:
        raise ValueError("add_safestep does not support Trainer(model_init=...): train() builds a new model and "
                         "optimizer, and the guard would be dropped")
    if unwrap_safestep(trainer.optimizer) is not None:
        raise ValueError("the Trainer's optimizer is already a SafeStep; add_safestep_callback(trainer) adds the "
                         "logging")
    safestep_options.setdefault("logits_fn", hf_logits_fn)
    safestep_options.setdefault("labels_fn", labels_fn_for(trainer.model))
    if trainer.is_fsdp_enabled:
        add_safestep_callback(trainer, prefix, seat=safestep_options)
        return None
    optimizer = trainer.optimizer if trainer.optimizer is not None else trainer.create_optimizer()
    guard = SafeStep(optimizer, trainer.model, **safestep_options)
    trainer.optimizer = guard
    add_safestep_callback(trainer, prefix)
    return guard


def _fsdp_version(trainer: transformers.Trainer) -> int:
    """The FSDP version of an FSDP Trainer's accelerate plugin (1 when it names none)."""
    return getattr(getattr(trainer.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)


def add_safestep_callback(trainer: transformers.Trainer, prefix: str = DEFAULT_PREFIX,
                          seat: dict[str, Any] | None = None) -> SafeStepTrainerCallback:
    """Insert a SafeStepTrainerCallback first in the trainer's callbacks (so reporters see its keys); returns it.

    ``seat`` (SafeStep's options) makes the callback build the guard when training begins (FSDP2 Trainers)."""
    callback = SafeStepTrainerCallback(prefix, seat)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
