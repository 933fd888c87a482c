"""OLMo-core: SafeStep as an optimizer config, and its statistics in the OLMo-core Trainer's metrics.

OLMo-core builds the optimizer from an ``OptimConfig`` after parallelizing the model, so ``SafeStepConfig`` guards
the inner config's optimizer on the parallelized model. Recipe and reasons: docs/integrations.md, "OLMo-core".
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from olmo_core.optim import AdamWConfig, OptimConfig
from olmo_core.train.callbacks import Callback
from torch import Tensor, nn

from ..guard import SafeStep
from ..probe import CallArgs, Inputs, call_model, extract_logits
from . import DEFAULT_PREFIX, report_metrics, unwrap_safestep, without_keys

__all__ = ["SafeStepConfig", "SafeStepCallback", "OLMoSafeStep", "olmo_logits_fn", "olmo_labels", "LOSS_KEYS"]

LOSS_KEYS = ("labels", "ignore_index", "loss_reduction", "z_loss_multiplier", "loss_div_factor", "return_logits")


def olmo_logits_fn(model: nn.Module, inputs: Inputs) -> Tensor:
    """The logits of an OLMo-core ``Transformer`` call: the call replayed without ``LOSS_KEYS`` (no loss computed)."""
    return extract_logits(call_model(model, without_keys(inputs, LOSS_KEYS)))


def olmo_labels(inputs: Inputs) -> Tensor | None:
    """The ``labels`` of the captured call: OLMo-core shifts them in the batch (``get_labels``), so logits row
    (b, t) is scored against labels[b, t] and −100 (the train module's ``label_ignore_index``) marks rows outside
    the loss. None when the call had no labels."""
    kwargs = inputs.kwargs if isinstance(inputs, CallArgs) else inputs if isinstance(inputs, Mapping) else {}
    labels = kwargs.get("labels")
    return labels if isinstance(labels, Tensor) else None


def is_state_init_step(optimizer: torch.optim.Optimizer) -> bool:
    """True for the step ``torch.distributed.checkpoint`` takes to initialize an empty optimizer state: the optimizer
    has no state, every group's learning rate is 0 and every gradient is present and zero."""
    if optimizer.state:
        return False
    groups = optimizer.param_groups
    if any(float(group.get("lr", 0.0)) != 0.0 for group in groups):
        return False
    grads = [p.grad for group in groups for p in group["params"] if p.requires_grad]
    return bool(grads) and all(g is not None and not bool(g.any()) for g in grads)


class OLMoSafeStep(SafeStep):
    """SafeStep that hands ``torch.distributed.checkpoint``'s state-initializing step (``is_state_init_step``) to
    the inner optimizer unguarded: no batch exists yet, the learning rates are 0 and nothing moves."""

    def _unguarded(self, closure: Any, inputs: Any, labels: Any) -> bool:
        return closure is None and inputs is None and labels is None and is_state_init_step(self.optimizer)


@dataclass
class SafeStepConfig(OptimConfig):
    """An ``OptimConfig`` that builds ``optim`` and guards it with SafeStep (the options are SafeStep's); its own
    ``group_overrides``, ``compile`` and ``fixed_fields`` are unused (the inner config's apply). Set the train
    module's ``label_ignore_index`` and ``ignore_index`` alike (both default to −100)."""

    optim: OptimConfig = field(default_factory=AdamWConfig)
    r: float = 1.0
    mode: str = "cap"
    bound: Any = "ghost"
    method: str = "auto"
    probe_size: Any = 0.125
    probe_select: str = "mixed"
    aggregate: Any = None
    ignore_index: int = -100
    history: int | None = 10_000

    @classmethod
    def optimizer(cls) -> type[SafeStep]:
        return OLMoSafeStep

    def build(self, model: nn.Module, strict: bool = True) -> SafeStep:  # type: ignore[override]
        """``OLMoSafeStep(self.optim.build(model, strict), model, ...)`` with OLMo-core's logits and labels."""
        if isinstance(self.optim, SafeStepConfig):
            raise ValueError("SafeStepConfig cannot wrap another SafeStepConfig")
        return OLMoSafeStep(self.optim.build(model, strict=strict), model, r=self.r, mode=self.mode, bound=self.bound,
                        method=self.method, probe_size=self.probe_size, probe_select=self.probe_select,
                        aggregate=self.aggregate, ignore_index=self.ignore_index, history=self.history,
                        logits_fn=olmo_logits_fn, labels_fn=olmo_labels)


@dataclass
class SafeStepCallback(Callback):
    """Record the guard's report of every optimizer step as trainer metrics (``report_metrics``), without a
    reduction: every rank holds the same report. Add it with ``TrainerConfig.with_callback("safestep", ...)``."""

    prefix: str = DEFAULT_PREFIX
    enabled: bool = True
    _last_step: int = field(default=-1, repr=False)

    def pre_train(self) -> None:
        """Check that the train module's optimizer is a SafeStep."""
        if not self.enabled:
            return
        guard = unwrap_safestep(getattr(self.trainer.train_module, "optim", None))
        if guard is None:
            raise ValueError("SafeStepCallback found no SafeStep optimizer: build the train module with "
                             "optim=SafeStepConfig(optim=...)")
        self._last_step = guard.steps - 1

    def post_train_batch(self) -> None:
        """Record the metrics of the step the guard just took (none when the batch did not step)."""
        if not self.enabled:
            return
        guard = unwrap_safestep(self.trainer.train_module.optim)
        report = guard.last_report if guard is not None else None
        if report is None or report.step <= self._last_step:
            return
        self._last_step = report.step
        for name, value in report_metrics(report, self.prefix).items():
            self.trainer.record_metric(name, value, reduce_type=None)
