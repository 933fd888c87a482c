"""SafeStep: a torch.optim.Optimizer wrapper that bounds the length of the inner optimizer's actual update.

One guarded step (MATH_RADIUS.md §A4–A5): snapshot θ0 → inner.step() → Δθ = θ1 − θ0, τ = ‖Δθ‖ →
probe the logits at θ0 along v = Δθ/τ on the captured batch → bound → ρ →
cap: s = min(1, r·ρ/τ) | set: s = r·ρ/τ → θ = θ0 + sΔθ (θ1 untouched, bit for bit, when s = 1).

The inner optimizer's state (momentum, Adam moments, step counts) advances with the raw gradient exactly as
in an unguarded run; only the applied step is scaled.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .bounds import Aggregate, BoundSpec, check_aggregate, make_bound
from .distributed import ShardedProbe, agree, check_reducible, is_sharded, local_tensor, make_reducer, probe_module
from .probe import METHODS, Inputs, InputCapture, LogitProbe, LogitsFn, Slopes, batch_size, probe_rows, take_rows
from .telemetry import History, ReportSink, StepReport

__all__ = ["SafeStep", "MODES", "DEFAULT_PROBE_SIZE"]

MODES = ("cap", "set", "monitor")
DEFAULT_PROBE_SIZE = 16
_GROUP_KEYS = {"safestep_steps": 0, "safestep_skipped": 0}


class SafeStep(torch.optim.Optimizer):
    """Wrap ``optimizer`` so that every applied update has length at most r·ρ (cap) or exactly r·ρ (set).

    ``mode="monitor"`` measures τ, ρ and r = τ/ρ of every step but applies the inner optimizer's update exactly
    as an unwrapped optimizer would (never scaled, skipped or restored): a read-only diagnostic.

    ``model`` is the network whose cross-entropy logits the step must keep analytic; a forward pre-hook
    captures the inputs of its latest gradient-recording call, or pass ``step(inputs=x)``. ``bound`` is
    "ghost" (π/Δ_a), "exact" (ρ*), "belief" (belief-space admissible step pulled back), a ``Bound`` or a list
    (their minimum). ``method`` "auto" | "jvp" | "fd" chooses the slope estimator, ``probe_size`` the number
    of batch rows probed (a fixed strided subset; None = all; batches normalized by train-mode BatchNorm are
    always probed in full), ``aggregate`` "max" or a quantile q. ``param_groups``, ``state`` and ``defaults``
    are the inner optimizer's, so schedulers, GradScaler, hooks and checkpoints work unchanged.

    Under torch.distributed (``process_group``, default: the default group when initialized) every rank probes
    its own batch and the radius and skip decisions are reduced across ranks, so every rank applies the same
    scale (see ``safestep.distributed``). A DDP-wrapped model is probed through its bare ``.module``; sharded
    (FSDP2 ``fully_shard``) parameters are probed by finite differences through the model's own forward; FSDP1
    ``FullyShardedDataParallel`` is refused with a ValueError.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        r: float = 1.0,
        mode: str = "cap",
        bound: BoundSpec = "ghost",
        method: str = "auto",
        probe_size: int | None = DEFAULT_PROBE_SIZE,
        aggregate: Aggregate = "max",
        logits_fn: LogitsFn | None = None,
        labels_fn: Callable[[Inputs], Tensor] | None = None,
        belief_rule: str = "paper",
        belief_backoff: bool = True,
        capture: bool = True,
        history: int | None = 10_000,
        sinks: Iterable[ReportSink] = (),
        process_group: Any = None,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(optimizer, (SafeStep, torch.optim.LBFGS)):
            raise ValueError(f"SafeStep cannot wrap {type(optimizer).__name__} (it needs one update per step)")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise ValueError(f"r must be a finite positive number, got {r!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if probe_size is not None and (isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size < 1):
            raise ValueError(f"probe_size must be a positive int or None (the whole batch), got {probe_size!r}")
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
        self.aggregate = check_aggregate(aggregate)
        self.bound = make_bound(bound, self.aggregate, belief_rule=belief_rule, belief_backoff=belief_backoff)
        self.labels_fn = labels_fn
        self.reducer = make_reducer(process_group)
        self.sharded = is_sharded(model)
        if self.sharded and method == "jvp":
            raise ValueError("method='jvp' cannot probe sharded (FSDP) parameters; use method='auto' or 'fd'")
        if self.reducer.active:
            check_reducible(self.bound)
        bare = probe_module(model)
        self.probe = ShardedProbe(bare, logits_fn) if self.sharded else LogitProbe(bare, logits_fn)
        self.capture = InputCapture(bare) if capture else None
        self.history = History(history, sinks)
        self.last_report: StepReport | None = None
        self._names = {id(p): name for name, p in bare.named_parameters()}
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

    def _check_params(self, params: Iterable[Tensor]) -> None:
        foreign = [p for p in params if id(p) not in self._names]
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
        return (f"SafeStep(r={self.r}, mode={self.mode!r}, bound={self.bound.name!r}, method={self.method!r}, "
                f"probe_size={self.probe_size}, aggregate={self.aggregate!r})\n{self.optimizer!r}")

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
        captured = self.capture.pop() if self.capture is not None else None
        inputs = captured if inputs is None else inputs
        params = [p for group in self.param_groups for p in group["params"]  # shards: the same list on every rank
                  if (p.grad is not None or self.sharded) and p.is_floating_point()]
        if params and inputs is None:
            raise ValueError(
                "SafeStep.step() has no batch to probe: call the model on the training batch (with gradients "
                "enabled) before step(), or pass it explicitly: opt.step(inputs=x) "
                "(a tuple for positional arguments, a dict for keyword arguments)"
            )
        if labels is None and self.labels_fn is not None and inputs is not None:
            labels = self.labels_fn(inputs)
        with torch.no_grad():
            report = self._guarded_update(params, inputs, labels)
        report = StepReport(**{**report, "seconds": time.perf_counter() - start, "step": self.steps})
        for group in self.param_groups:
            group["safestep_steps"] += 1
            group["safestep_skipped"] += int(report.skipped)
        self.last_report = report
        self.history.append(report)
        return loss

    def _guarded_update(self, params: list[Tensor], inputs: Inputs | None, labels: Tensor | None) -> dict[str, Any]:
        name = self.bound.name
        if not params:
            self.optimizer.step()
            return _record(0.0, math.inf, 1.0, name)
        if self.reducer.any(not _all_finite([local_tensor(p.grad) for p in params if p.grad is not None])):
            if self.mode == "monitor":
                self.optimizer.step()
                return _record(math.nan, math.nan, 1.0, name, reason="non-finite gradient: applied unmeasured (monitor)")
            return _record(math.nan, math.nan, 0.0, name, skipped=True, reason="non-finite gradient: step skipped")
        live = [local_tensor(p).detach() for p in params]
        theta0 = [t.clone() for t in live]
        self.optimizer.step()
        direction = torch._foreach_sub(live, theta0)
        tau_t, theta_norm = self._norms(direction, theta0)
        tau = tau_t.item()
        if not math.isfinite(tau):
            return self._uncertified(live, theta0, tau, name, "non-finite update")
        if tau == 0.0:
            return _record(0.0, math.inf, 1.0, name, reason="zero update")
        torch._foreach_div_(direction, tau_t)
        batch = batch_size(inputs)
        rows = None if self.probe.uses_batch_statistics() else probe_rows(batch, self.probe_size)
        probe_size = batch if rows is None else rows.numel()
        slopes = self._probe(params, live, theta0, direction, theta_norm,
                             inputs if rows is None else take_rows(inputs, rows, batch))
        finite = bool(torch.isfinite(slopes.logits).all() and torch.isfinite(slopes.slopes).all())
        if labels is not None and rows is not None:
            labels = labels.index_select(0, rows.to(labels.device))
        if self.reducer.active:
            agreement = agree(self.bound, self.reducer, slopes if finite else None, labels, tau)
            if not agreement.tau_agrees():
                torch._foreach_copy_(live, theta0)
                raise RuntimeError(
                    f"the update length τ differs across ranks ({agreement.tau_min:.6g} to {agreement.tau_max:.6g}): "
                    "the parameters are not replicated; wrap the model in DistributedDataParallel (averaged "
                    "gradients) or shard it with FSDP2 (parameters restored to their value before the step)"
                )
            finite, rho = agreement.probe_ok, agreement.rho
        if not finite:
            return self._uncertified(live, theta0, tau, name, "non-finite probe output", slopes.method, probe_size)
        if not self.reducer.active:
            rho = float(self.bound(slopes.logits, slopes.slopes, labels))
        scale, reason = self._scale(tau, rho)
        if scale != 1.0:
            torch._foreach_lerp_(live, theta0, 1.0 - scale)
        return _record(tau, rho, scale, name, slopes.method, probe_size, reason=reason)

    def _norms(self, direction: list[Tensor], theta0: list[Tensor]) -> tuple[Tensor, float]:
        """τ = ‖Δθ‖ and ‖θ0‖; sharded: √(Σ_r ‖·_r‖²) over the ranks' shards (one all_reduce SUM)."""
        if not self.sharded:
            return _global_norm(direction), math.nan
        squares = self.reducer.sum(torch.stack([_global_norm(direction), _global_norm(theta0)]) ** 2)
        tau_t, theta_t = squares.sqrt()
        return tau_t, theta_t.item()

    def _probe(self, params: list[Tensor], live: list[Tensor], theta0: list[Tensor], direction: list[Tensor],
               theta_norm: float, inputs: Inputs) -> Slopes:
        with self.capture.paused() if self.capture is not None else contextlib.nullcontext():
            if isinstance(self.probe, ShardedProbe):
                h = torch.finfo(theta0[0].dtype).eps ** (1 / 3) * max(1.0, theta_norm)
                return self.probe(live, theta0, direction, inputs, h)
            names = [self._names[id(p)] for p in params]
            return self.probe(dict(zip(names, theta0)), dict(zip(names, direction)), inputs, self.method)

    def _uncertified(self, live: list[Tensor], theta0: list[Tensor], tau: float, bound: str, why: str,
                     method: str = "none", probe_size: int = 0) -> dict[str, Any]:
        """A step no radius certifies: restored to θ0 and reported skipped (cap, set), or left applied (monitor)."""
        if self.mode == "monitor":
            return _record(tau, math.nan, 1.0, bound, method, probe_size, reason=f"{why}: applied unmeasured (monitor)")
        torch._foreach_copy_(live, theta0)
        return _record(tau, math.nan, 0.0, bound, method, probe_size, skipped=True, reason=f"{why}: parameters restored")

    def _scale(self, tau: float, rho: float) -> tuple[float, str]:
        if self.mode == "monitor":
            return 1.0, ""
        if math.isinf(rho):
            return 1.0, "infinite radius: inner update applied unscaled"
        target = self.r * rho / tau
        if self.mode == "cap":
            return (1.0, "") if target >= 1.0 else (target, "capped")
        return target, ""


def _record(tau: float, rho: float, scale: float, bound: str, method: str = "none", probe_size: int = 0,
            skipped: bool = False, reason: str = "") -> dict[str, Any]:
    r = tau / rho if rho != 0 else (0.0 if tau == 0 else math.inf)
    return dict(tau=tau, rho=rho, r=r, scale=scale, bound=bound, method=method, probe_size=probe_size,
                skipped=skipped, seconds=0.0, reason=reason)


def _global_norm(tensors: list[Tensor]) -> Tensor:
    """‖(t_1, …, t_n)‖₂ over all tensors, accumulated in float64 on the first tensor's device."""
    device = tensors[0].device
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float64)
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


def _all_finite(tensors: list[Tensor]) -> bool:
    return not tensors or bool(torch.isfinite(_global_norm(tensors)))
