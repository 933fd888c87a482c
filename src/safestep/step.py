"""One guarded step as one function: ``prepare_batch`` validates with nothing changed, ``safe_step`` steps.

snapshot θ0 → inner step → Δθ, τ → slopes on the probed rows → ρ → one host read (the decision) → scale → write
| restore θ0 → StepReport; the pipeline, its host reads and its rollback are docs/step.md."""
from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .bounds import IGNORE_INDEX, Bound, Min, aggregate_radii, bound_radius, leaves, make_bound
from .collectives import Reducer
from .layout import local_tensor
from .probe import (DEFAULT_PROBE_SIZE, METHODS, SELECTIONS, Displacement, Inputs, Probe, ProbeSize, Slopes,
                    batch_size, check_probe_size, choose_rows, eligible_rows, probe_count, shared_leaves, take_rows)
from .telemetry import StepReport
from .update import apply, displacement, gradients_finite, restore, snapshot

__all__ = ["MODES", "StepConfig", "StepTarget", "RunState", "Schema", "Batch", "prepare_batch", "safe_step",
           "Radius", "radius", "Decision", "read_decision", "scale_for", "skips_on_device"]

MODES = ("cap", "set", "monitor")
_PREFLIGHT_ROWS = 2
ROLLED_BACK = ("safestep: the step was rolled back: the parameters are restored to their values before the step "
               "(θ0, bit for bit); the inner optimizer's state (moments, step counts) has advanced by this step")


@dataclass(frozen=True)
class StepConfig:
    """How every step is guarded (validated once, on construction): mode, r, bound, slope estimator, probe budget
    and row choice, and the label that marks rows outside the loss."""

    mode: str = "cap"
    r: float = 1.0
    bound: Bound | Min = field(default_factory=lambda: make_bound("ghost"))
    method: str = "auto"
    probe_size: ProbeSize = DEFAULT_PROBE_SIZE
    probe_select: str = "mixed"
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (isinstance(self.r, (int, float)) and not isinstance(self.r, bool) and math.isfinite(self.r)
                and self.r > 0):
            raise ValueError(f"r must be a finite positive number, got {self.r!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_probe_size(self.probe_size)
        if self.probe_select not in SELECTIONS:
            raise ValueError(f"probe_select must be one of {tuple(SELECTIONS)}, got {self.probe_select!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")


@dataclass
class StepTarget:
    """What a step probes and with whom it agrees: the model's probe, the rank reducer, whether parameters are
    sharded, and ``quiet()``, a context in which the model's own forwards are not captured as training calls."""

    probe: Probe
    reducer: Reducer = field(default_factory=Reducer)
    sharded: bool = False
    quiet: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


@dataclass(frozen=True)
class Schema:
    """What the first step learned about the logits: classes K, row dimensions, whether −inf (masked) classes occur."""

    classes: int
    row_dims: int
    masked: bool


@dataclass
class RunState:
    """What a run carries from step to step: the schema, the number of steps (it rotates the probe's stride) and
    the once-only notes already given."""

    schema: Schema | None = None
    steps: int = 0
    noted: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Batch:
    """A validated step: the probed rows and their labels (IGNORE_INDEX outside the loss), rows probed and in the
    batch, why rows or method differ from the options (or ""), the estimator and, for "reuse", z(θ0) of the rows."""

    inputs: Inputs | None
    labels: Tensor | None
    rows_probed: int
    rows_in_batch: int
    note: str = ""
    method: str = "auto"
    reference: Tensor | None = None


# -- validation: before anything changes ------------------------------------------------------------------------
def prepare_batch(config: StepConfig, target: StepTarget, state: RunState, params: Sequence[Tensor],
                  inputs: Inputs | None, labels: Any = None, scores: Tensor | None = None,
                  reference: Tensor | None = None) -> Batch:
    """Check the batch and labels and choose the probe rows, with nothing changed yet (ValueError on bad input);
    ``scores`` and ``reference`` ("reuse") are the training forward's, used when they fit the batch."""
    if not params:
        return Batch(None, None, 0, 0, method=config.method)
    if inputs is None:
        raise ValueError(
            "SafeStep.step() has no batch to probe: call the model on the training batch (with gradients "
            "enabled) before step(), or pass it explicitly: opt.step(inputs=x) "
            "(a tuple for positional arguments, a dict for keyword arguments)")
    rows_in_batch = batch_size(inputs)
    scores = scores if scores is not None and scores.shape[0] == rows_in_batch else None
    if rows_in_batch == 0:
        raise ValueError("the batch is empty (0 rows): there is nothing to probe and no update to bound; skip the "
                         "step (do not call step()) for an empty batch")
    labels = None if labels is None else _checked_labels(labels, rows_in_batch, config.ignore_index, state.schema)
    shared = shared_leaves(inputs, rows_in_batch)
    method, reference, why = _estimator(config, state, reference, rows_in_batch)
    if state.schema is None:
        state.schema = _preflight(config, target, params, inputs, labels, rows_in_batch, whole=bool(shared),
                                  reference=reference)
    elif labels is not None and labels.ndim != state.schema.row_dims:
        raise ValueError(f"labels have {labels.ndim} dimension(s) but the model's logits have "
                         f"{state.schema.row_dims} row dimension(s) (one label per logits row)")
    rows, note = _probe_rows(config, target, state, inputs, labels, scores, rows_in_batch, shared)
    note = "; ".join(n for n in (why, note) if n)
    if rows is None:
        return Batch(inputs, labels, rows_in_batch, rows_in_batch, note, method, reference)
    inputs, labels, reference = take_rows((inputs, labels, reference), rows, rows_in_batch)
    return Batch(inputs, labels, rows.numel(), rows_in_batch, note, method, reference)


def _estimator(config: StepConfig, state: RunState, reference: Tensor | None,
               rows_in_batch: int) -> tuple[str, Tensor | None, str]:
    """(the slope estimator, the reference logits it uses, a once-note when "reuse" falls back to the JVP)."""
    if config.method != "reuse":
        return config.method, None, ""
    if reference is not None and reference.ndim >= 2 and reference.shape[0] == rows_in_batch:
        return "reuse", reference, ""
    return "jvp", None, _once(state, "reuse", "method='reuse' has no training-forward logits for this batch (inputs= "
                              "was passed, or capture=False): its slopes come from the JVP")


def _checked_labels(labels: Any, rows_in_batch: int, ignore_index: int, schema: Schema | None) -> Tensor:
    """Integer labels, one per batch row, with ``ignore_index`` mapped to IGNORE_INDEX; on the host (CPU labels)
    every label is range-checked here, device labels are checked by the step's decision flags."""
    if (not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool):
        kind = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor of class indices, got {kind}")
    if labels.ndim == 0 or labels.shape[0] != rows_in_batch:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the batch has {rows_in_batch} rows: give one "
                         "label per logits row, batch first (ignore_index for rows outside the loss)")
    if ignore_index != IGNORE_INDEX:
        labels = labels.masked_fill(labels == ignore_index, IGNORE_INDEX)
    if schema is not None and labels.device.type == "cpu":
        _check_label_range(labels, schema.classes, ignore_index)
    return labels


def _check_label_range(labels: Tensor, classes: int, ignore_index: int) -> None:
    valid = ((labels >= 0) & (labels < classes)) | (labels == IGNORE_INDEX)
    if not bool(valid.all()):
        bad = labels[~valid]
        raise ValueError(f"labels must be class indices in [0, {classes}) or ignore_index {ignore_index}, got "
                         f"{int(bad.min())}..{int(bad.max())} at {int(bad.numel())} row(s)")


def _preflight(config: StepConfig, target: StepTarget, params: Sequence[Tensor], inputs: Inputs,
               labels: Tensor | None, rows_in_batch: int, whole: bool, reference: Tensor | None = None) -> Schema:
    """First step only: the probe at θ0 on two rows (``whole``: every row) learns K and checks logits and labels;
    for method "reuse" the training forward's logits must be the probe's function at θ0 (no dropout, no autocast)."""
    coupled = whole or target.probe.uses_batch_statistics()
    rows = torch.arange(min(_PREFLIGHT_ROWS, rows_in_batch))
    probed, picked, reference = ((inputs, labels, reference) if coupled
                                 else take_rows((inputs, labels, reference), rows, rows_in_batch))
    live = [local_tensor(p).detach() for p in params]
    one = torch.ones((), dtype=torch.float64, device=live[0].device)
    method = "jvp" if config.method == "reuse" else config.method
    with target.quiet(), torch.no_grad():
        logits = target.probe.along(params, Displacement(live, [torch.zeros_like(t) for t in live], one, one),
                                    probed, method).logits
    if reference is not None:
        _check_reference(reference, logits)
    if logits.shape[-1] < 2:
        raise ValueError(f"the model's logits have K = {logits.shape[-1]} class(es) in their last dimension; "
                         "cross-entropy over fewer than 2 classes is constant, there is no step to bound")
    if labels is not None:
        if tuple(picked.shape) != tuple(logits.shape[:-1]):
            raise ValueError(_row_mismatch(tuple(labels.shape), tuple(logits.shape), rows_in_batch))
        _check_label_range(labels.cpu(), logits.shape[-1], config.ignore_index)
    return Schema(logits.shape[-1], logits.ndim - 1, bool(torch.isneginf(logits).any()))


def _check_reference(reference: Tensor, logits: Tensor) -> None:
    """Method "reuse" is sound only if the training forward computed the probe's deterministic function at θ0."""
    scale = float(logits.detach().abs().amax().clamp(min=1.0))
    if reference.shape != logits.shape or float((reference.to(logits.dtype) - logits).abs().amax()) > 1e-4 * scale:
        raise ValueError("method='reuse' needs the training forward to compute the same function as the probe (no "
                         "active dropout, no autocast, the same logits at θ0), but its logits differ from the probe's "
                         "by more than 1e-4 of their scale: use method='auto'")


def _row_mismatch(labels: tuple[int, ...], logits: tuple[int, ...], rows_in_batch: int) -> str:
    """What to do when the labels' rows and the logits' rows differ (nanoGPT's ``logits[:, [-1]]`` among them)."""
    hint = ""
    if len(logits) == 3 and len(labels) == 2 and logits[1] < labels[1]:
        hint = (f" The model returned logits for {logits[1]} position(s) of {labels[1]}: a model that returns only "
                "the last position when called without targets (nanoGPT's forward) must be probed with every "
                "position, e.g. inputs=(x, y) so the model is called as in training, or logits_fn=lambda model, "
                "inputs: <the full (B, T, V) logits>.")
    return (f"labels have shape {labels} (batch of {rows_in_batch}) but the model's logits have shape "
            f"(B, {', '.join(map(str, logits[1:]))}) per probed batch: give one label per logits row.{hint}")


def _probe_rows(config: StepConfig, target: StepTarget, state: RunState, inputs: Inputs, labels: Tensor | None,
                scores: Tensor | None, rows_in_batch: int, shared: list[str]) -> tuple[Tensor | None, str]:
    """The batch rows to probe (None: all of them) and why the choice differs from the options (or "")."""
    if target.probe.uses_batch_statistics():
        return None, ""
    count = probe_count(rows_in_batch, config.probe_size)
    if count >= rows_in_batch:
        return None, ""
    if shared:
        return None, _once(state, "shared", f"argument(s) {', '.join(shared)} have a leading size equal to both the "
                           f"batch ({rows_in_batch}) and the sequence length, so rows cannot be told from positions: "
                           "the whole batch is probed")
    share = SELECTIONS[config.probe_select]
    note = ""
    if share > 0 and scores is None:
        note = _once(state, "scores", f"probe_select={config.probe_select!r} has no row scores for this batch (the "
                     "training forward's logits were not captured for it, or K > 4096 without labels_fn): rows "
                     "come from the rotated stride")
    active = None if labels is None else eligible_rows(labels)
    return choose_rows(rows_in_batch, count, scores, state.steps, share, active), note


def _once(state: RunState, key: str, text: str) -> str:
    """``text`` the first time ``key`` is noted in this run, "" afterwards."""
    if key in state.noted:
        return ""
    state.noted.add(key)
    return text


# -- the transaction -------------------------------------------------------------------------------------------
def safe_step(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], batch: Batch, config: StepConfig,
              target: StepTarget, state: RunState, start: float | None = None) -> StepReport:
    """One guarded step of ``optimizer`` over ``params`` (the trainable parameters), probed on ``batch``; any exception
    after the snapshot restores θ0 bit for bit and carries a note saying so. ``state.steps`` is the caller's."""
    start = time.perf_counter() if start is None else start
    report = functools.partial(_report, config, state, batch, start)
    if not params:
        optimizer.step()
        return report(0.0, math.inf, 1.0, reason="no parameter has a gradient")
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    finite = target.reducer.min(gradients_finite(grads).to(torch.float64).reshape(1))
    on_device = config.mode != "monitor" and skips_on_device(optimizer)
    if not on_device and not finite.item() > 0:  # host read 1 of 2 (none for optimizers that skip on the device)
        if config.mode != "monitor":
            return report(math.nan, math.nan, 0.0, skipped=True, reason="non-finite gradient: step skipped")
        finite = None  # monitor: applied as the inner optimizer does, unmeasured
    live = [local_tensor(p).detach() for p in params]
    theta0 = snapshot(live)
    try:
        _inner_step(optimizer, finite if on_device else None)
        if finite is None:
            return report(math.nan, math.nan, 1.0, reason="non-finite gradient: applied unmeasured (monitor)")
        return _measured(params, live, theta0, batch, config, target, state, report, finite if on_device else None)
    except BaseException as error:
        restore(live, theta0)
        if hasattr(error, "add_note"):
            error.add_note(ROLLED_BACK)
        raise


def _measured(params: Sequence[Tensor], live: list[Tensor], theta0: list[Tensor], batch: Batch, config: StepConfig,
              target: StepTarget, state: RunState, report: Callable[..., StepReport],
              finite: Tensor | None) -> StepReport:
    """Δθ, τ, the slopes, ρ and the decision; then the guarded write (or the restore)."""
    assert state.schema is not None
    step = displacement(live, theta0, target.reducer, target.sharded)
    with target.quiet(), torch.no_grad():
        slopes = target.probe.along(params, step, batch.inputs, batch.method, batch.reference)
    found = radius(config.bound, slopes, batch.labels, step.tau, masked=state.schema.masked, reducer=target.reducer)
    decision = read_decision(step, found, finite)  # host read 2 of 2: the apply decision
    if not decision.gradients_ok:  # the inner optimizer skipped its update on the device: nothing moved
        restore(live, theta0)
        return report(math.nan, math.nan, 0.0, skipped=True, reason="non-finite gradient: step skipped")
    if decision.masked and not state.schema.masked:  # −inf logits appear: from now on their slopes are ignored
        state.schema = Schema(state.schema.classes, state.schema.row_dims, True)
        if not math.isfinite(decision.rho) and decision.tau > 0:  # their slopes broke this step's radius
            found = radius(config.bound, slopes, batch.labels, step.tau, masked=True, reducer=target.reducer)
            decision = read_decision(step, found, finite)
    _check_decision(decision, slopes.logits.shape[-1], config.ignore_index)
    tau, rho = decision.tau, decision.rho
    binding = list(leaves(config.bound))[decision.binding].name
    reason = "".join(f"{n}; " for n in (slopes.note, batch.note) if n)  # the probe's and the row choice's notes
    if not math.isfinite(tau):
        return _uncertified(live, theta0, config, report, tau, binding, slopes, reason + "non-finite update")
    if tau == 0.0:  # lr = 0 (a warm-up's first step) or a zero gradient: no direction, nothing to bound
        return report(0.0, math.inf, 1.0, binding, slopes.method, reason=reason + "zero update: nothing to bound")
    if decision.broken or not rho > 0:  # NaN, or 0 from a spread that overflowed
        return _uncertified(live, theta0, config, report, tau, binding, slopes, reason + "non-finite probe output")
    scale, why = scale_for(config.mode, config.r, tau, rho)
    if config.mode != "monitor" and math.isfinite(rho):
        scale = apply(live, step, scale, config.r * rho, tau, decision.theta_norm, target.reducer, target.sharded)
        if scale == 0.0:
            return report(tau, rho, 0.0, binding, slopes.method, skipped=True, reason=reason +
                          "no step of length <= r·rho is representable at this precision: parameters restored")
    return report(tau, rho, scale, binding, slopes.method, reason=reason + why)


def _check_decision(decision: "Decision", classes: int, ignore_index: int) -> None:
    """Raise for labels out of range (device labels) and for parameters that differ across ranks."""
    if decision.bad_labels:
        raise ValueError(f"labels must be class indices in [0, {classes}) or ignore_index {ignore_index}")
    if decision.tau_high - decision.tau_low > 1e-6 * decision.tau_high:
        raise RuntimeError(
            f"the update length τ differs across ranks ({decision.tau_low:.6g} to {decision.tau_high:.6g}): the "
            "parameters are not replicated; wrap the model in DistributedDataParallel (averaged gradients) or shard "
            "it with FSDP2, and build SafeStep after fully_shard (a guard built before sharding measures each "
            "rank's shard as if it were the whole model; accelerate: safestep.integrations.seat_safestep)")


def _uncertified(live: list[Tensor], theta0: list[Tensor], config: StepConfig, report: Callable[..., StepReport],
                 tau: float, binding: str, slopes: Slopes, why: str) -> StepReport:
    """A step no radius certifies: restored to θ0 and reported skipped (cap, set), or left applied (monitor)."""
    if config.mode == "monitor":
        return report(tau, math.nan, 1.0, binding, slopes.method, reason=f"{why}: applied unmeasured (monitor)")
    restore(live, theta0)
    return report(tau, math.nan, 0.0, binding, slopes.method, skipped=True, reason=f"{why}: parameters restored")


def _report(config: StepConfig, state: RunState, batch: Batch, start: float, tau: float, rho: float, scale: float,
            bound: str | None = None, method: str = "none", skipped: bool = False, reason: str = "") -> StepReport:
    """The step's ``StepReport`` (r = τ/ρ, r_applied = s·r, the batch's row counts, the wall time since ``start``)."""
    ratio = 0.0 if tau == 0 else (tau / rho if rho != 0 else math.inf)
    return StepReport(tau=tau, rho=rho, r_proposed=ratio, scale=scale, r_applied=0.0 if skipped else scale * ratio,
                      bound=config.bound.name if bound is None else bound, method=method,
                      rows_probed=batch.rows_probed, skipped=skipped, seconds=time.perf_counter() - start,
                      step=state.steps, reason=reason, rows_in_batch=batch.rows_in_batch)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers (fused Adam, AdamW, SGD, Adagrad) that skip their whole update, state included, when
    their ``found_inf`` tensor is non-zero: the non-finite-gradient check then needs no host read."""
    amp_aware = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
    return amp_aware and getattr(optimizer, "found_inf", None) is None


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


# -- ρ over rows and ranks, and the one host read ------------------------------------------------------------------
@dataclass(frozen=True)
class Radius:
    """ρ over the probed rows of every rank, the flags (``_row_checks``) of every rank, the index of the leaf that
    set ρ (a tensor when there are several) and τ's (min, max) over ranks (None alone); device tensors."""

    rho: Tensor
    flags: Tensor
    binding: Tensor | int
    tau_range: Tensor | None


def _row_checks(slopes: Slopes, labels: Tensor | None) -> Tensor:
    """(an active row has a NaN or infinite logit, a label is neither a class index nor IGNORE_INDEX, a −inf logit
    exists) as 0/1 float64 flags, from one min and one max reduction of the logits."""
    logits = slopes.logits
    low, high = logits.amin(dim=-1), logits.amax(dim=-1)  # two passes: aminmax is ~5x slower on CPU
    broken = torch.isnan(low) | (high == math.inf) | (high == -math.inf)
    masked = torch.isneginf(low).any()
    if labels is None:
        return torch.stack([broken.any(), torch.zeros_like(masked), masked]).to(torch.float64)
    labels = labels.to(logits.device)
    ignored = labels == IGNORE_INDEX
    invalid = ((labels < 0) | (labels >= logits.shape[-1])) & ~ignored
    return torch.stack([(broken & ~ignored).any(), invalid.any(), masked]).to(torch.float64)


def radius(bound: Bound | Min, slopes: Slopes, labels: Tensor | None, tau: Tensor, *, masked: bool,
           reducer: Reducer) -> Radius:
    """ρ = min over the bound's leaves of each leaf's radius, every leaf reduced over ranks on its own (docs/step.md,
    "Over ranks"); a leaf that validates its input runs only when every row is finite (one host read to know)."""
    flags = _row_checks(slopes, labels)
    members = list(leaves(bound))
    usable = all(m.accepts_nonfinite for m in members) or not bool(flags[:2].any())
    quantile = [m.aggregate != "max" for m in members]
    local = [_local_radius(m, slopes, labels, masked, usable, tau.device) for m, q in zip(members, quantile) if not q]
    tau_range = None
    maxed = iter(local)
    if reducer.active:
        carried = reducer.min(torch.cat([-flags, torch.stack([tau, -tau]),
                                         *[torch.nan_to_num(r, nan=math.inf).reshape(1) for r in local]]))
        flags, tau_range, maxed = -carried[:3], torch.stack([carried[3], -carried[4]]), iter(list(carried[5:]))
    radii = [_global_quantile(m, slopes, labels, masked, reducer, usable) if q else next(maxed)
             for m, q in zip(members, quantile)]
    if len(radii) == 1:
        return Radius(radii[0], flags, 0, tau_range)
    stacked = torch.stack(radii)
    return Radius(stacked.amin(), flags, stacked.argmin(), tau_range)


def _local_radius(member: Bound, slopes: Slopes, labels: Tensor | None, masked: bool, usable: bool,
                  device: torch.device) -> Tensor:
    if not usable:
        return torch.tensor(math.nan, dtype=torch.float64, device=device)
    return bound_radius(member, slopes.logits, slopes.slopes, labels, masked=masked).to(device, torch.float64)


def _global_quantile(member: Bound, slopes: Slopes, labels: Tensor | None, masked: bool, reducer: Reducer,
                     usable: bool) -> Tensor:
    """The member's quantile over the rows of every rank (a rank whose rows are unusable contributes none)."""
    if usable:
        rows = member.row_radii(slopes.logits, slopes.slopes, labels, masked=masked).reshape(-1).to(torch.float64)
        active = (torch.ones_like(rows) if labels is None
                  else (labels.reshape(-1) != IGNORE_INDEX).to(rows.device, torch.float64))
        table = torch.stack([rows, active], dim=1)
    else:
        table = torch.zeros((0, 2), dtype=torch.float64, device=slopes.logits.device)
    gathered = reducer.gather_rows(table)
    if gathered.shape[0] == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=table.device)
    return aggregate_radii(gathered[:, 0], member.aggregate, gathered[:, 1] > 0)


@dataclass(frozen=True)
class Decision:
    """What the apply decision needs, read from the device in one go (``read_decision``)."""

    tau: float
    rho: float
    theta_norm: float
    broken: bool  # a NaN or infinite logit on an active row
    bad_labels: bool  # a label neither a class index nor IGNORE_INDEX
    masked: bool  # a −inf logit was seen
    gradients_ok: bool  # false when an optimizer that skips on the device skipped this update
    binding: int  # index of the leaf bound that set ρ
    tau_low: float
    tau_high: float


def read_decision(step: Displacement, found: Radius, finite_gradients: Tensor | None = None) -> Decision:
    """The step's one host read: τ, ρ, ‖θ0‖, the flags, the binding leaf and τ's range over ranks."""
    grads_ok = torch.ones(1, dtype=torch.float64) if finite_gradients is None else finite_gradients
    read = [torch.stack([step.tau, found.rho, step.theta_norm]), found.flags, grads_ok.to(found.flags.device)]
    if isinstance(found.binding, Tensor):
        read.append(found.binding.reshape(1).to(torch.float64))
    if found.tau_range is not None:
        read.append(found.tau_range)
    values = torch.cat(read).tolist()
    tau, rho, theta_norm, broken, bad_labels, masked, gradients_ok = values[:7]
    binding = int(values[7]) if isinstance(found.binding, Tensor) else 0
    tau_low, tau_high = values[-2:] if found.tau_range is not None else (tau, tau)
    return Decision(tau, rho, theta_norm, broken > 0, bad_labels > 0, masked > 0, gradients_ok > 0, binding,
                    tau_low, tau_high)


def scale_for(mode: str, r: float, tau: float, rho: float) -> tuple[float, str]:
    """s: 1 (monitor; or an infinite radius), min(1, r·ρ/τ) (cap) or r·ρ/τ (set); with the reason for the report."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "monitor":
        return 1.0, ""
    if math.isinf(rho):
        return 1.0, "infinite radius: inner update applied unscaled"
    target = r * rho / tau
    if mode == "cap":
        return (1.0, "") if target >= 1.0 else (target, "capped")
    return target, ""
