"""PyTorch Lightning: feed the training batch to SafeStep and log its reports through ``pl_module.log``.

Return ``SafeStep(inner, self)`` (or a submodule) from ``configure_optimizers`` and add ``SafeStepCallback()``;
Fabric needs no callback, only ``fabric_logits_fn`` under a mixed precision (docs/integrations.md).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..guard import SafeStep
from ..probe import Inputs, LogitsFn, default_logits_fn
from . import DEFAULT_PREFIX, report_metrics, reports_after, unwrap_safestep

__all__ = ["SafeStepCallback", "default_batch_to_inputs", "fabric_logits_fn", "PROGRESS_BAR_KEYS"]

BatchFn = Callable[[Any], Any]
PROGRESS_BAR_KEYS = ("r_applied", "capped")
"""The metrics shown in the progress bar: the applied step in radius units and whether the guard shortened it."""


def fabric_logits_fn(fabric: Any, logits_fn: LogitsFn | None = None) -> LogitsFn:
    """``logits_fn`` (default: call the module, take its logits) run under ``fabric.autocast()``: Fabric autocasts
    in its wrapper around the guarded module, so the probe's forward of the bare module needs the same autocast."""
    inner = default_logits_fn if logits_fn is None else logits_fn

    def logits(module: Any, inputs: Inputs) -> Tensor:
        with fabric.autocast():
            return inner(module, inputs)

    return logits


def default_batch_to_inputs(batch: Any) -> Inputs:
    """x of a batch: the batch itself if it is a tensor, its first element if it is a tuple or list (x, y, ...)."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(f"cannot tell the model inputs in a training batch of type {type(batch).__name__}; pass "
                     "SafeStepCallback(batch_to_inputs=lambda batch: ...) returning what the guarded model is "
                     "called on")


class SafeStepCallback(pl.Callback):
    """Feed each training batch to the SafeStep optimizer(s) and log their reports (``report_metrics``).

    Inputs probed: ``batch_to_inputs(batch)`` when given (as ``step(inputs=...)``, over the forward hook), else what
    the forward hook captured, else ``default_batch_to_inputs(batch)``; ``batch_to_labels(batch)`` goes to
    ``step(labels=...)``. Metrics are logged on_step after each batch that stepped a guard, as ``{prefix}tau`` …
    (``{prefix}{i}/tau`` … with several guards); the progress bar shows ``PROGRESS_BAR_KEYS`` unless ``prog_bar=False``.
    """

    def __init__(self, batch_to_inputs: BatchFn | None = None, batch_to_labels: BatchFn | None = None, *,
                 prefix: str = DEFAULT_PREFIX, prog_bar: bool = True, log_metrics: bool = True) -> None:
        for name, fn in (("batch_to_inputs", batch_to_inputs), ("batch_to_labels", batch_to_labels)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable or None, got {type(fn).__name__}")
        self.batch_to_inputs = batch_to_inputs
        self.batch_to_labels = batch_to_labels
        self.prefix = prefix
        self.prog_bar = prog_bar
        self.log_metrics = log_metrics
        self._guards: list[SafeStep] = []
        self._last_step: dict[int, int] = {}
        self._handles: list[RemovableHandle] = []
        self._batch: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the SafeStep optimizers and hook their step so the batch can be passed explicitly."""
        self._remove_hooks()
        self._guards = [guard for guard in map(unwrap_safestep, trainer.optimizers) if guard is not None]
        if not self._guards:
            raise ValueError("SafeStepCallback found no SafeStep optimizer: return SafeStep(optimizer, model) "
                             "from configure_optimizers")
        self._last_step = {id(guard): guard.steps - 1 for guard in self._guards}
        self._handles = [guard.register_step_pre_hook(self._feed) for guard in self._guards]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """Remember the batch (by reference) for the coming optimizer step."""
        self._batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """After forward and backward, before the guard (on both of Lightning's step paths, ``SafeStep.step(closure)``
        and ``scaler.step``): if the forward hook captured nothing, hand it the default inputs."""
        guard = unwrap_safestep(optimizer)
        if guard is None or guard.capture is None or self.batch_to_inputs is not None or self._batch is None:
            return
        if guard.capture.latest is None:
            guard.capture.latest = default_batch_to_inputs(self._batch)

    def _feed(self, guard: SafeStep, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        """Step pre-hook: add ``inputs``/``labels`` keywords computed from the current batch."""
        if self._batch is None:
            return None
        extra: dict[str, Any] = {}
        if kwargs.get("inputs") is None and (self.batch_to_inputs is not None or guard.capture is None):
            extra["inputs"] = (self.batch_to_inputs or default_batch_to_inputs)(self._batch)
        if kwargs.get("labels") is None and self.batch_to_labels is not None:
            extra["labels"] = self.batch_to_labels(self._batch)
        return (args, {**kwargs, **extra}) if extra else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the latest report of every guard that stepped during this batch."""
        self._batch = None
        for index, guard in enumerate(self._guards):
            reports = reports_after(guard, self._last_step[id(guard)])
            if not reports:
                continue
            self._last_step[id(guard)] = reports[-1].step
            if self.log_metrics:
                prefix = self.prefix if len(self._guards) == 1 else f"{self.prefix}{index}/"
                self._log(pl_module, report_metrics(reports[-1], prefix), prefix)

    def _log(self, pl_module: pl.LightningModule, metrics: dict[str, float], prefix: str) -> None:
        """Log every metric to the loggers; show only PROGRESS_BAR_KEYS in the progress bar."""
        bar = {prefix + key: metrics.pop(prefix + key) for key in PROGRESS_BAR_KEYS}
        for group, shown in ((metrics, False), (bar, self.prog_bar)):
            pl_module.log_dict(group, on_step=True, on_epoch=False, prog_bar=shown, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Unhook the guards."""
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Unhook the guards."""
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
