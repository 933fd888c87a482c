"""SafeStep: the torch.optim adapter over the functional step core (``safestep.step``; docs/step.md).

One guarded step is a transaction: validate (batch, labels, probe rows) → snapshot θ0 → inner.step() →
Δθ = θ1 − θ0, τ = ‖Δθ‖ → probe the logits at θ0 along Δθ/τ → bound → ρ → s (cap: min(1, r·ρ/τ), set: r·ρ/τ)
→ θ = θ0 + s·Δθ (θ1 untouched, bit for bit, when s = 1) → report. Any exception after the snapshot restores θ0
before it propagates. This class holds what torch.optim expects of an optimizer (param_groups, state, hooks,
state_dict), the captured batch and the history; the step itself is ``safestep.step``'s pure functions.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .bounds import IGNORE_INDEX, Aggregate, BoundSpec, leaves, make_bound
from .collectives import make_reducer
from .distributed import is_sharded, local_tensor, make_probe, probe_module
from .probe import (METHODS, SELECTIONS, CallArgs, Displacement, InputCapture, Inputs, LogitsFn, ProbeSize, as_batch,
                    batch_size, check_probe_size, choose_rows, extract_logits, probe_count, row_scores, take_rows)
from .step import (MODES, Decision, apply, displacement, gradients_finite, probe_slopes, radius, read_decision, restore,
                   scale_for, snapshot)
from .telemetry import History, ReportSink, StepReport

__all__ = ["SafeStep", "MODES", "DEFAULT_PROBE_SIZE", "FREEZE_SCALE", "FREEZE_STEPS"]

DEFAULT_PROBE_SIZE = 0.125  # an eighth of the batch rows (docs/probe_budget.md)
_GROUP_KEYS = {"safestep_steps": 0, "safestep_skipped": 0}
FREEZE_SCALE = 0.1  # an applied scale below this ...
FREEZE_STEPS = 50  # ... for this many consecutive steps is reported as a frozen run (once per run as a warning)
_PREFLIGHT_ROWS = 2
_ROLLED_BACK = ("safestep: the step was rolled back: the parameters are restored to their values before the step "
                "(θ0, bit for bit); the inner optimizer's state (moments, step counts) has advanced by this step")


@dataclass(frozen=True)
class _Schema:
    """What the first step learned about the model's logits: classes K, row dimensions, masked (−inf) classes."""

    classes: int
    row_dims: int
    masked: bool


@dataclass(frozen=True)
class _Plan:
    """A validated step: the probed rows of the batch, their labels (IGNORE_INDEX for ignored rows), the row count."""

    inputs: Inputs | None
    labels: Tensor | None
    rows: int


class SafeStep(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that every applied update has length at most r·ρ (cap) or exactly r·ρ (set).

    ``mode="monitor"`` measures τ, ρ and r = τ/ρ of every step but applies the inner optimizer's update exactly
    as an unwrapped optimizer would (never scaled, skipped or restored): a read-only diagnostic.

    ``model`` is the network whose cross-entropy logits the step must keep analytic; a forward pre-hook
    captures its latest gradient-recording call (replayed exactly), or pass ``step(inputs=x)``. ``bound`` is
    "ghost" (π/Δ_a), "exact" (ρ*), "belief" (belief-space admissible step pulled back), a ``Bound`` or a list
    (their minimum); ``aggregate`` ("max" or a quantile q) applies to bounds given by name. ``method``
    "auto" | "jvp" | "fd" chooses the slope estimator. ``probe_size`` is the probe's budget: a share of the batch
    rows (default 1/8), a row count, or None for the whole batch (a full-batch certificate); batches normalized by
    train-mode BatchNorm are always probed in full. ``probe_select`` chooses the rows: "mixed" (default) half the
    budget on the rows the training forward's logits rank hardest, half on a stride rotated every step; "score" or
    "stride" all of it on one rule (docs/probe_budget.md). Labels
    (``step(labels=...)`` or ``labels_fn(batch)``) equal to ``ignore_index`` mark rows outside the loss.
    ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's, so schedulers, GradScaler, hooks and
    checkpoints work unchanged; other public attributes of the inner optimizer (``AdamWScheduleFree.train()``)
    are reachable through the wrapper.

    **All or nothing.** Everything checkable is checked before the inner step (the batch, the labels' type and
    batch size, the probe rows; on the first step also the logits, K >= 2, the labels' range and forward-mode AD
    support). An exception after the inner step (a model or ``logits_fn`` that raises, labels out of range, a
    sink that cannot write, ...) restores the parameters to θ0 bit for bit and leaves counters, ``last_report``
    and history as they were; the inner optimizer's state is *not* rolled back — copying it every step would
    cost two more parameter-sized buffers for Adam — and the exception's note says so.

    Under torch.distributed (``process_group``, default: the default group when initialized) every rank probes
    its own batch and the radius and skip decisions are reduced across ranks, so every rank applies the same
    scale. A DDP-wrapped model is probed through its bare ``.module``; sharded (FSDP2 ``fully_shard``)
    parameters are probed by finite differences through the model's own forward; FSDP1 is refused.
    """

    _step_supports_amp_scaling = False  # GradScaler must unscale and check for infs itself, then call step()

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        r: float = 1.0,
        mode: str = "cap",
        bound: BoundSpec = "ghost",
        method: str = "auto",
        probe_size: ProbeSize = DEFAULT_PROBE_SIZE,
        probe_select: str = "mixed",
        aggregate: Aggregate | None = None,
        logits_fn: LogitsFn | None = None,
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
                             "gradient-accumulation micro-batch and see gradients before the GradScaler unscales them")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0):
            raise ValueError(f"r must be a finite positive number, got {r!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        check_probe_size(probe_size)
        if probe_select not in SELECTIONS:
            raise ValueError(f"probe_select must be one of {tuple(SELECTIONS)}, got {probe_select!r}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        for name, fn in (("logits_fn", logits_fn), ("labels_fn", labels_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be callable or None, got {type(fn).__name__}")
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        self.optimizer = optimizer
        self.model = model
        self.r = float(r)
        self.mode = mode
        self.method = method
        self.probe_size = probe_size
        self.probe_select = probe_select
        self.bound = make_bound(bound, aggregate)
        self.labels_fn = labels_fn
        self.ignore_index = ignore_index
        self.reducer = make_reducer(process_group)
        self.sharded = is_sharded(probe_module(model))
        if self.sharded and method == "jvp":
            raise ValueError("method='jvp' cannot probe sharded (FSDP) parameters; use method='auto' or 'fd'")
        self.probe = make_probe(model, logits_fn)
        scorer = self._row_scores if capture and SELECTIONS[probe_select] > 0 else None
        self.capture = InputCapture(probe_module(model), scorer) if capture else None
        self.history = History(history, sinks)
        self.last_report: StepReport | None = None
        self._schema: _Schema | None = None
        self._small_streak = 0  # consecutive applied steps with scale < FREEZE_SCALE
        self._warned_frozen = False
        for group in optimizer.param_groups:
            self._check_params(group["params"])
            self._add_group_keys(group)

    # -- the inner optimizer's containers, shared -------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

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
            raise ValueError(
                f"{len(foreign)} optimizer parameter(s) (shapes {shapes}) are not parameters of the model; "
                "SafeStep probes the model, so the wrapped optimizer must optimize model.parameters()"
            )

    @staticmethod
    def _add_group_keys(group: dict[str, Any]) -> None:
        for key, value in _GROUP_KEYS.items():
            group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (its parameters must belong to the model)."""
        params = param_group["params"]
        self._check_params([params] if isinstance(params, Tensor) else list(params))
        self.optimizer.add_param_group(param_group)
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
        """Number of guarded steps taken (saved in the state dict)."""
        return self.optimizer.param_groups[0]["safestep_steps"]

    def step(self, closure: Callable[[], Any] | None = None, *, inputs: Inputs | None = None,
             labels: Tensor | None = None) -> Any:  # type: ignore[override]
        """One guarded step; returns the closure's loss (torch convention). The report is ``last_report``."""
        start = time.perf_counter()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        captured, scores = self.capture.take() if self.capture is not None else (None, None)
        params = self._trainable()
        try:
            plan = self._plan(params, captured if inputs is None else inputs, labels, scores if inputs is None else None)
            with torch.no_grad():
                report = self._transaction(params, plan, start)
        except BaseException:
            if self.capture is not None:
                self.capture.put_back(captured, scores)  # a failed step keeps the batch: step() can be called again
            raise
        for group in self.param_groups:
            group["safestep_steps"] += 1
            group["safestep_skipped"] += int(report.skipped)
        self._small_streak = self._streak_after(report)
        self.last_report = report
        if self._small_streak >= FREEZE_STEPS and not self._warned_frozen:
            self._warned_frozen = True
            warnings.warn(f"safestep: the {report.bound!r} bound has kept every step below {FREEZE_SCALE} of its "
                          f"proposed length for {self._small_streak} steps: training is all but frozen ({report.reason})",
                          RuntimeWarning, stacklevel=2)
        return loss

    def _streak_after(self, report: StepReport) -> int:
        """The run of consecutive applied steps shortened below FREEZE_SCALE, including ``report``."""
        if report.skipped or report.scale >= FREEZE_SCALE:
            return 0
        return self._small_streak + 1

    def _trainable(self) -> list[Tensor]:
        """The parameters this step moves (the same list on every rank when sharded)."""
        return [p for group in self.param_groups for p in group["params"]
                if (p.grad is not None or self.sharded) and p.is_floating_point()]

    # -- validation: before anything changes -------------------------------------------------------------------
    def _plan(self, params: list[Tensor], batch: Inputs | None, labels: Tensor | None, scores: Tensor | None) -> _Plan:
        if not params:
            return _Plan(None, None, 0)
        if batch is None:
            raise ValueError(
                "SafeStep.step() has no batch to probe: call the model on the training batch (with gradients "
                "enabled) before step(), or pass it explicitly: opt.step(inputs=x) "
                "(a tuple for positional arguments, a dict for keyword arguments)"
            )
        rows_in_batch = batch_size(batch)
        if labels is None and self.labels_fn is not None:
            labels = self.labels_fn(as_batch(batch))
        labels = None if labels is None else self._checked_labels(labels, rows_in_batch)
        rows = None if self.probe.uses_batch_statistics() else choose_rows(
            rows_in_batch, probe_count(rows_in_batch, self.probe_size), scores, self.steps, SELECTIONS[self.probe_select])
        if rows is not None:
            batch = take_rows(batch, rows, rows_in_batch)
            labels = None if labels is None else labels.index_select(0, rows.to(labels.device))
        plan = _Plan(batch, labels, rows_in_batch if rows is None else rows.numel())
        if self._schema is None:
            self._schema = self._preflight(params, plan)
        elif labels is not None and labels.ndim != self._schema.row_dims:
            raise ValueError(f"labels have {labels.ndim} dimension(s) but the model's logits have "
                             f"{self._schema.row_dims} row dimension(s) (one label per logits row)")
        return plan

    def _checked_labels(self, labels: Any, rows_in_batch: int) -> Tensor:
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor of class indices, got "
                             f"{type(labels).__name__ if not isinstance(labels, Tensor) else labels.dtype}")
        if labels.ndim == 0 or labels.shape[0] != rows_in_batch:
            raise ValueError(f"labels have shape {tuple(labels.shape)} but the batch has {rows_in_batch} rows: give one "
                             "label per logits row, batch first (ignore_index for rows outside the loss)")
        if self.ignore_index != IGNORE_INDEX:
            labels = labels.masked_fill(labels == self.ignore_index, IGNORE_INDEX)
        return labels

    def _preflight(self, params: list[Tensor], plan: _Plan) -> _Schema:
        """First step only: call the probe on a few rows at θ0 to learn K and check labels, logits and AD support."""
        count = min(_PREFLIGHT_ROWS, batch_size(plan.inputs))
        rows = torch.arange(count)
        inputs = plan.inputs if self.probe.uses_batch_statistics() else take_rows(plan.inputs, rows, batch_size(plan.inputs))
        live = [local_tensor(p).detach() for p in params]
        tangent = [torch.zeros_like(t) for t in live]
        one = torch.ones((), dtype=torch.float64, device=live[0].device)
        with self._probe_context():
            slopes = probe_slopes(self.probe, params, Displacement(live, tangent, one, one), inputs, self.method)
        logits = slopes.logits
        if logits.shape[-1] < 2:
            raise ValueError(f"the model's logits have K = {logits.shape[-1]} class(es) in their last dimension; "
                             "cross-entropy over fewer than 2 classes is constant, there is no step to bound")
        if plan.labels is not None:
            labels = plan.labels if self.probe.uses_batch_statistics() else plan.labels.index_select(0, rows.to(plan.labels.device))
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(f"labels have rows {tuple(plan.labels.shape)[1:]} per batch row but the logits have "
                                 f"{tuple(logits.shape[1:-1])}: give one label per logits row")
            valid = ((labels >= 0) & (labels < logits.shape[-1])) | (labels == IGNORE_INDEX)
            if not bool(valid.all()):
                raise ValueError(f"labels must be class indices in [0, {logits.shape[-1]}) or ignore_index "
                                 f"{self.ignore_index}, got values in [{int(labels.min())}, {int(labels.max())}]")
        return _Schema(logits.shape[-1], logits.ndim - 1, bool(torch.isneginf(logits).any()))

    def _row_scores(self, call: CallArgs, output: object) -> Tensor:
        """Row scores of a training forward (see ``probe.selection``), with labels from ``labels_fn`` if there is one."""
        labels = None
        if self.labels_fn is not None:
            labels = self._checked_labels(self.labels_fn(as_batch(call)), batch_size(call))
        return row_scores(extract_logits(output), labels)

    def _probe_context(self) -> contextlib.AbstractContextManager:
        return self.capture.paused() if self.capture is not None else contextlib.nullcontext()

    # -- the transaction ------------------------------------------------------------------------------------------
    def _transaction(self, params: list[Tensor], plan: _Plan, start: float) -> StepReport:
        if not params:
            self.optimizer.step()
            return self._report(start, 0.0, math.inf, 1.0, reason="no parameter has a gradient")
        grads = [local_tensor(p.grad) for p in params if p.grad is not None]
        finite = self.reducer.min(gradients_finite(grads).to(torch.float64).reshape(1))
        on_device = self.mode != "monitor" and _skips_on_device(self.optimizer)
        if not on_device and not finite.item() > 0:  # host read 1 of 2 (none for optimizers that skip on device)
            if self.mode != "monitor":
                report = self._report(start, math.nan, math.nan, 0.0, skipped=True,
                                      reason="non-finite gradient: step skipped")
                self.history.append(report)
                return report
            finite = None  # monitor: applied as the inner optimizer does, unmeasured
        live = [local_tensor(p).detach() for p in params]
        theta0 = snapshot(live)
        try:
            _inner_step(self.optimizer, finite if on_device else None)
            if finite is None:
                report = self._report(start, math.nan, math.nan, 1.0,
                                      reason="non-finite gradient: applied unmeasured (monitor)")
            else:
                report = self._measured(params, live, theta0, plan, start, finite if on_device else None)
            if self._streak_after(report) >= FREEZE_STEPS:
                report = replace(report, reason=f"{report.reason}; frozen: scale < {FREEZE_SCALE} for "
                                                f"{self._streak_after(report)} steps, set by the {report.bound} bound")
            self.history.append(report)
        except BaseException as error:
            restore(live, theta0)
            if hasattr(error, "add_note"):
                error.add_note(_ROLLED_BACK)
            raise
        return report

    def _measured(self, params: list[Tensor], live: list[Tensor], theta0: list[Tensor], plan: _Plan,
                  start: float, finite_gradients: Tensor | None) -> StepReport:
        assert self._schema is not None
        step = displacement(live, theta0, self.reducer, self.sharded)
        with self._probe_context():
            slopes = probe_slopes(self.probe, params, step, plan.inputs, self.method)
        found = radius(self.bound, slopes, plan.labels, step.tau, masked=self._schema.masked, reducer=self.reducer)
        decision = read_decision(step, found, finite_gradients)  # host read 2 of 2: the apply decision
        if not decision.gradients_ok:  # the inner optimizer skipped its update on the device: nothing moved
            restore(live, theta0)
            return self._report(start, math.nan, math.nan, 0.0, skipped=True, reason="non-finite gradient: step skipped")
        if decision.masked and not self._schema.masked:  # −inf logits appeared: measure again over live classes
            self._schema = replace(self._schema, masked=True)
            found = radius(self.bound, slopes, plan.labels, step.tau, masked=True, reducer=self.reducer)
            decision = replace(decision, rho=float(found.rho), binding=int(found.binding))
        self._check_decision(decision, slopes.logits.shape[-1])
        tau, rho = decision.tau, decision.rho
        bound = list(leaves(self.bound))[decision.binding].name
        method, rows = slopes.method, plan.rows
        note = f"{slopes.note}; " if slopes.note else ""
        if not math.isfinite(tau):
            return self._uncertified(live, theta0, start, tau, bound, method, rows, note + "non-finite update")
        if tau == 0.0:
            return self._report(start, 0.0, rho, 1.0, bound, method, rows, reason=note + "zero update")
        if decision.broken or not rho > 0:  # NaN, or 0 from a spread that overflowed
            return self._uncertified(live, theta0, start, tau, bound, method, rows, note + "non-finite probe output")
        scale, reason = scale_for(self.mode, self.r, tau, rho)
        if self.mode != "monitor" and math.isfinite(rho):
            scale = apply(live, step, scale, self.r * rho, tau, decision.theta_norm, self.reducer, self.sharded)
            if scale == 0.0:
                return self._report(start, tau, rho, 0.0, bound, method, rows, skipped=True, reason=note +
                                    "no step of length <= r·rho is representable at this precision: parameters restored")
        return self._report(start, tau, rho, scale, bound, method, rows, reason=note + reason)

    def _check_decision(self, decision: Decision, classes: int) -> None:
        """Raise for labels out of range and for parameters that differ across ranks (both caught after the step)."""
        if decision.bad_labels:
            raise ValueError(f"labels must be class indices in [0, {classes}) or ignore_index {self.ignore_index}")
        if decision.tau_high - decision.tau_low > 1e-6 * decision.tau_high:
            raise RuntimeError(
                f"the update length τ differs across ranks ({decision.tau_low:.6g} to {decision.tau_high:.6g}): the "
                "parameters are not replicated; wrap the model in DistributedDataParallel (averaged gradients) or shard "
                "it with FSDP2")

    def _uncertified(self, live: list[Tensor], theta0: list[Tensor], start: float, tau: float, bound: str, method: str,
                     rows: int, why: str) -> StepReport:
        """A step no radius certifies: restored to θ0 and reported skipped (cap, set), or left applied (monitor)."""
        if self.mode == "monitor":
            return self._report(start, tau, math.nan, 1.0, bound, method, rows, reason=f"{why}: applied unmeasured (monitor)")
        restore(live, theta0)
        return self._report(start, tau, math.nan, 0.0, bound, method, rows, skipped=True, reason=f"{why}: parameters restored")

    def _report(self, start: float, tau: float, rho: float, scale: float, bound: str | None = None,
                method: str = "none", rows: int = 0, skipped: bool = False, reason: str = "") -> StepReport:
        ratio = tau / rho if rho != 0 else (0.0 if tau == 0 else math.inf)
        return StepReport(tau=tau, rho=rho, r_proposed=ratio, scale=scale, r_applied=0.0 if skipped else scale * ratio,
                          bound=bound or self.bound.name, method=method, rows_probed=rows, skipped=skipped,
                          seconds=time.perf_counter() - start, step=self.steps, reason=reason)


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers (fused Adam, AdamW, SGD, Adagrad) that skip their whole update, state included, when
    their ``found_inf`` tensor is non-zero: the non-finite-gradient check then needs no host read."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and getattr(optimizer, "found_inf", None) is None


def _inner_step(optimizer: torch.optim.Optimizer, finite: Tensor | None) -> None:
    """optimizer.step(); with ``finite`` (1.0 = every gradient finite), the device-side skip is armed for the call."""
    if finite is None:
        optimizer.step()
        return
    optimizer.found_inf = (1.0 - finite).to(torch.float32).reshape(())
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
