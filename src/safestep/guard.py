"""SafeStep: the torch.optim adapter (param_groups, state, hooks, state_dict, the captured training call, history)
over the one functional step: ``step()`` gathers parameters, batch and labels for ``prepare_batch``, ``safe_step``."""
from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .bounds import IGNORE_INDEX, Aggregate, BoundSpec, make_bound
from .collectives import make_reducer
from .layout import capture_module, is_sharded, probe_module
from .probe import (DEFAULT_PROBE_SIZE, CallArgs, InputCapture, Inputs, LogitProbe, ProbeSize, as_batch,
                    extract_logits, row_scores)
from .probe.sharded import ShardedProbe
from .step import MODES, RunState, StepConfig, StepTarget, prepare_batch, safe_step
from .telemetry import History, ReportSink, StepReport
from .watch import FreezeWatch

__all__ = ["SafeStep", "MODES", "DEFAULT_PROBE_SIZE"]

_GROUP_KEYS = {"safestep_steps": 0, "safestep_skipped": 0}


def _shared(name: str) -> property:
    """The inner optimizer's attribute ``name``, read and written through the wrapper."""

    def get(self: "SafeStep") -> Any:
        return getattr(self.optimizer, name)

    def put(self: "SafeStep", value: Any) -> None:
        setattr(self.optimizer, name, value)

    return property(get, put, doc=f"The inner optimizer's {name}.")


class SafeStep(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that every applied update has length at most r·ρ (cap) or exactly r·ρ (set);
    ``mode="monitor"`` measures τ, ρ and r = τ/ρ and applies the inner update exactly as it was proposed.

    ``model``'s latest gradient-recording call is captured and replayed by the probe (or pass ``step(inputs=x)``);
    the options are README.md's table. ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's, and
    its other public attributes are reachable through the wrapper. All or nothing: everything checkable is checked
    before the inner step, and an exception after it restores θ0 bit for bit — but not the inner optimizer's state
    (docs/step.md). Under torch.distributed (``process_group``) every rank applies the same scale; FSDP1 is refused.
    """

    _step_supports_amp_scaling = False  # GradScaler must unscale and check for infs itself, then call step()

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        r: float | None = None,
        mode: str = "cap",
        bound: BoundSpec = "ghost",
        method: str = "auto",
        probe_size: ProbeSize = DEFAULT_PROBE_SIZE,
        probe_select: str = "mixed",
        aggregate: Aggregate | None = None,
        logits_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        labels_fn: Callable[[Inputs], Tensor] | None = None,
        ignore_index: int = IGNORE_INDEX,
        capture: bool = True,
        history: int | None = 10_000,
        sinks: Iterable[ReportSink] = (),
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, (SafeStep, torch.optim.LBFGS)):
            raise ValueError(f"SafeStep cannot wrap {type(optimizer).__name__} (it needs one update per step)")
        accelerated = getattr(sys.modules.get("accelerate.optimizer"), "AcceleratedOptimizer", None)
        if accelerated is not None and isinstance(optimizer, accelerated):
            raise ValueError("wrap the optimizer before accelerator.prepare: accelerator.prepare(model, "
                             "SafeStep(optimizer, model), ...); wrapped after, the guard would run on every "
                             "gradient-accumulation micro-batch and see gradients before the GradScaler unscales them "
                             "(under FSDP2, prepare first and seat the guard inside accelerate's wrapper with "
                             "safestep.integrations.seat_safestep)")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if mode == "monitor" and r is not None:
            raise ValueError("r has no effect in mode='monitor' (the step is measured, never scaled): leave it out, "
                             "or use mode='cap' to apply it")
        self.config = StepConfig(mode=mode, r=1.0 if r is None else r, bound=make_bound(bound, aggregate),
                                 method=method, probe_size=probe_size, probe_select=probe_select,
                                 ignore_index=ignore_index)
        for name, fn in (("logits_fn", logits_fn), ("labels_fn", labels_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable or None, got {type(fn).__name__}")
        bare = probe_module(model)  # inside DDP wrappers and torch.compile: the module the probe runs eagerly
        sharded = is_sharded(bare)
        if sharded and method in ("jvp", "reuse"):
            raise ValueError(f"method={method!r} cannot probe sharded (FSDP) parameters; use method='auto' or 'fd'")
        self.model = model
        for group in optimizer.param_groups:
            self._check_params(group["params"])
        probe = ShardedProbe(bare, logits_fn) if sharded else LogitProbe(bare, logits_fn)  # may refuse the model
        for hooks in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                      "load_state_dict_post"):  # the hook tables torch.optim.Optimizer.__init__ would make
            setattr(self, f"_optimizer_{hooks}_hooks", OrderedDict())
        self._patch_step_function()
        self.optimizer = optimizer
        self.labels_fn = labels_fn
        self.capture = InputCapture(capture_module(model), self._row_scores) if capture else None
        self.target = StepTarget(probe, make_reducer(process_group), sharded, self._quiet)
        self.run = RunState()
        self.history = History(history, sinks)
        self.last_report: StepReport | None = None
        self.watch = FreezeWatch()
        self._forward_labels: tuple[CallArgs, Tensor | None] | None = None  # labels_fn's result for the captured call
        self._forward_logits: tuple[CallArgs, Tensor] | None = None  # its logits, kept for method="reuse" only
        for group in optimizer.param_groups:
            self._add_group_keys(group)

    # -- the options, as the step config holds them ---------------------------------------------------------------
    r = property(lambda self: self.config.r, doc="The step length in radius units (cap: at most r·ρ; set: r·ρ).")
    mode = property(lambda self: self.config.mode, doc='"cap", "set" or "monitor".')
    bound = property(lambda self: self.config.bound, doc="The bound (a Bound or a Min of bounds).")
    method = property(lambda self: self.config.method, doc='The slope estimator: "auto", "jvp" or "fd".')
    probe_size = property(lambda self: self.config.probe_size, doc="The probe's budget (share, rows, or None: all).")
    probe_select = property(lambda self: self.config.probe_select, doc='The row choice: "mixed", "score", "stride".')
    ignore_index = property(lambda self: self.config.ignore_index, doc="The label of rows outside the loss.")
    probe = property(lambda self: self.target.probe, doc="The model's probe.")
    reducer = property(lambda self: self.target.reducer, doc="The rank reductions (identity without a group).")
    sharded = property(lambda self: self.target.sharded, doc="True for FSDP2-sharded parameters.")

    # -- the inner optimizer's containers, shared -------------------------------------------------------
    param_groups = _shared("param_groups")  # type: ignore[assignment]
    state = _shared("state")  # type: ignore[assignment]
    defaults = _shared("defaults")  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        """Public attributes of the inner optimizer that torch.optim does not define (``train()``, ``eval()``, ...)."""
        optimizer = self.__dict__.get("optimizer")
        if optimizer is None or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(optimizer, name)

    def _check_params(self, params: Iterable[Tensor]) -> None:
        known = {id(p) for p in probe_module(self.model).parameters()}
        foreign = [p for p in params if id(p) not in known]
        if foreign:
            shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:3])
            raise ValueError(f"{len(foreign)} optimizer parameter(s) (shapes {shapes}) are not parameters of the "
                             "model; SafeStep probes the model, so the wrapped optimizer must optimize "
                             "model.parameters()")

    @staticmethod
    def _add_group_keys(group: dict[str, Any]) -> None:
        for key, value in _GROUP_KEYS.items():
            group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (its parameters must belong to the model; a generator is read once)."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        self._check_params(params)
        self.optimizer.add_param_group({**param_group, "params": params})
        self._add_group_keys(self.optimizer.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizer's zero_grad."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (the guard's counters live in its param_groups as ``safestep_*``)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer (a plain optimizer's state dict works too: counters start at 0)."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        self.optimizer.load_state_dict(state_dict)
        for group in self.optimizer.param_groups:
            self._add_group_keys(group)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"SafeStep(r={self.r}, mode={self.mode!r}, bound={self.bound!r}, method={self.method!r}, "
                f"probe_size={self.probe_size}, probe_select={self.probe_select!r})\n{self.optimizer!r}")

    # -- the guarded step ------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of guarded steps taken (saved in the state dict; 0 after the inner optimizer loads a plain one)."""
        return self.optimizer.param_groups[0].get("safestep_steps", 0) if self.optimizer.param_groups else 0

    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Inputs | None = None,
             labels: Tensor | None = None) -> Any:  # type: ignore[override]
        """One guarded step of the captured training call (or ``inputs``) with ``labels``, else ``labels_fn`` of the
        batch (computed once, at the training forward); returns the closure's loss, the report is ``last_report``."""
        if self._unguarded(closure, inputs, labels):
            return self.optimizer.step()
        start = time.perf_counter()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        captured, scores = self.capture.take() if self.capture is not None else (None, None)
        forward_labels, self._forward_labels = self._forward_labels, None
        forward_logits, self._forward_logits = self._forward_logits, None
        batch = captured if inputs is None else inputs
        reference = forward_logits[1] if forward_logits is not None and forward_logits[0] is batch else None
        params = [p for group in self.param_groups for p in group["params"]  # the same list on every rank if sharded
                  if (p.grad is not None or self.sharded) and p.is_floating_point()]
        try:
            if labels is None and self.labels_fn is not None and batch is not None:
                reused = forward_labels is not None and forward_labels[0] is batch
                labels = forward_labels[1] if reused else self.labels_fn(as_batch(batch))  # type: ignore[index]
            self.run.steps = self.steps
            plan = prepare_batch(self.config, self.target, self.run, params, batch, labels, scores, reference)
            with torch.no_grad():
                report = safe_step(self.optimizer, params, plan, self.config, self.target, self.run, start)
            verdict = self.watch.peek(report)
            if verdict.note:
                report = replace(report, reason=f"{report.reason}; {verdict.note}" if report.reason else verdict.note)
        except BaseException:
            if self.capture is not None:
                self.capture.put_back(captured, scores)  # a failed step keeps the batch: step() can be called again
            self._forward_labels, self._forward_logits = forward_labels, forward_logits
            raise
        self._commit(report)
        return loss

    def _unguarded(self, closure: Any, inputs: Any, labels: Any) -> bool:
        """True for a step handed to the inner optimizer as is: never here; integrations override this, not ``step``."""
        return False

    def _commit(self, report: StepReport) -> None:
        """Count the step, keep its report, then hand it to the history and sinks (a failing sink loses only its
        copy: the step stays applied and counted, and the sink's error is raised afterwards)."""
        for group in self.param_groups:
            group["safestep_steps"] = group.get("safestep_steps", 0) + 1
            group["safestep_skipped"] = group.get("safestep_skipped", 0) + int(report.skipped)
        self.last_report = report
        verdict = self.watch.record(report)
        if verdict.warning:
            warnings.warn(f"safestep: {verdict.warning}", RuntimeWarning, stacklevel=3)
        self.history.append(report)

    def _row_scores(self, call: CallArgs, output: object) -> Tensor | None:
        """Row scores of a training forward (``probe.row_scores``), with ``labels_fn``'s labels (and, for
        method="reuse", the logits themselves, by reference) kept for the step."""
        if self.config.method == "reuse":
            self._forward_logits = (call, extract_logits(output).detach())
        labels = None
        if self.labels_fn is not None:
            labels = self.labels_fn(as_batch(call))
            self._forward_labels = (call, labels)
        if self.config.probe_select == "stride":
            return None
        valid = isinstance(labels, Tensor) and not labels.is_floating_point() and labels.ndim > 0
        return row_scores(extract_logits(output), labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
                          if valid else None)

    def _quiet(self) -> contextlib.AbstractContextManager:
        """The probe's own forwards are not training calls: capture is paused while they run."""
        return self.capture.paused() if self.capture is not None else contextlib.nullcontext()
