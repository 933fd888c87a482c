"""find_lr: the largest base learning rate λ whose warm-up steps all keep r = τ/ρ ≤ 1, searched in rounds.

For an update linear in the LR (Δθ = λ·u: SGD, Adam/AdamW, ...) one measured step gives lr_safe = λ·ρ/τ = λ/r;
each round trains at one λ from the initial state, and the suggestion is the largest λ whose round measured r ≤ 1
on every step (docs/lr_finder.md)."""
from __future__ import annotations

import copy
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import Aggregate, BoundSpec
from .guard import SafeStep
from .probe import Inputs, LogitsFn, ProbeSize, default_logits_fn

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["LRStep", "LRRound", "LRFinderResult", "find_lr", "cross_entropy"]

LossFn = Callable[[Tensor, Any], Tensor]
InputsFn = Callable[[Any], "tuple[Inputs, Any]"]
Progress = Callable[["LRStep"], None]


@dataclass(frozen=True)
class LRStep:
    """One measured warm-up step: τ = ‖Δθ‖ at LR ``lr``, radius ρ along Δθ/τ, r = τ/ρ, lr_safe = lr·ρ/τ; ``loss``
    is the batch's training loss before the step; ``skipped`` marks a step that could not be measured (a non-finite
    gradient, update or probe: r and lr_safe are nan, and the round counts as unsafe)."""

    round: int
    step: int
    lr: float
    loss: float
    tau: float
    rho: float
    r: float
    lr_safe: float
    skipped: bool


@dataclass(frozen=True)
class LRRound:
    """``num_steps`` warm-up steps from the initial state at one constant base LR ``lr``."""

    lr: float
    steps: tuple[LRStep, ...]

    @property
    def max_r(self) -> float:
        """max_t r_t over the round (inf when a step was skipped: a non-finite step is never safe)."""
        return math.inf if any(s.skipped for s in self.steps) else max(s.r for s in self.steps)

    @property
    def verified(self) -> bool:
        """True when every step of the round had r ≤ 1."""
        return self.max_r <= 1.0

    @property
    def proposal(self) -> float:
        """min_t lr_safe_t over the measured steps = lr / max_t r_t (nan when no step could be measured)."""
        measured = [s.lr_safe for s in self.steps if not s.skipped]
        return min(measured) if measured else math.nan


@dataclass(frozen=True)
class LRFinderResult:
    """The rounds of a safe-LR search; ``suggestion`` is the largest base LR of a verified round (every warm-up step
    at r ≤ 1), or — when no round was verified (``verified`` False) — the LR the search would have tried next, which
    is untested; ``inf`` when no step limited the LR (zero updates or zero slope spread throughout)."""

    suggestion: float
    verified: bool
    rounds: tuple[LRRound, ...]
    window: int = 5

    @property
    def best_round(self) -> LRRound:
        """The round trained at the suggestion (the last round when none was verified)."""
        return max((r for r in self.rounds if r.verified), key=lambda r: r.lr, default=self.rounds[-1])

    @property
    def steps(self) -> tuple[LRStep, ...]:
        """The per-step records of ``best_round``."""
        return self.best_round.steps

    @property
    def lr_safe(self) -> list[float]:
        """lr_safe_t = λ·ρ_t/τ_t per warm-up step of ``best_round``: the LR at which step t alone reaches r = 1."""
        return [s.lr_safe for s in self.steps]

    @property
    def schedule(self) -> list[float]:
        """min of lr_safe over a centered window of ``window`` steps: the shape of the headroom along the trajectory
        trained at the suggestion, not a certificate (docs/lr_finder.md)."""
        return rolling_min(self.lr_safe, self.window)

    def plot(self, ax: Any = None) -> Any:
        """r_t per warm-up step for every round (log y) with the r = 1 line; returns the matplotlib Axes."""
        ax = _axes(ax)
        best = self.best_round
        for k, rnd in enumerate(self.rounds):
            mark = "  ← suggestion" if rnd is best and self.verified else ""
            ax.plot([s.step for s in rnd.steps], [_positive(s.r) for s in rnd.steps], marker=".",
                    linewidth=2.2 if rnd is best else 1.0, alpha=1.0 if rnd is best else 0.55,
                    label=f"round {k}: lr={rnd.lr:.3g}, max r={rnd.max_r:.3g}{mark}")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1.2, label="r = 1 (radius of convergence)")
        title = f"safe LR search: suggestion {self.suggestion:.3g}" + ("" if self.verified else " (unverified)")
        return _finish(ax, "r = τ/ρ (normalized step)", title)

    def plot_schedule(self, ax: Any = None) -> Any:
        """lr_safe_t per warm-up step (log y), the windowed-min schedule and the suggestion; returns the Axes."""
        ax = _axes(ax)
        steps = [s.step for s in self.steps]
        ax.plot(steps, [_positive(v) for v in self.lr_safe], ".", color="tab:blue",
                label=f"lr_safe per step (round at lr={self.best_round.lr:.3g})")
        ax.plot(steps, [_positive(v) for v in self.schedule], color="tab:blue", linewidth=2.0,
                label=f"schedule (min over {self.window} steps)")
        ax.axhline(self.suggestion, color="tab:green", linewidth=1.5, label=f"suggestion {self.suggestion:.3g}")
        return _finish(ax, "base learning rate", "largest LR with r ≤ 1, per warm-up step")


def rolling_min(values: Sequence[float], window: int) -> list[float]:
    """m_t = min(values[t − ⌊w/2⌋ : t + ⌊w/2⌋ + 1]) (nan entries ignored; nan where the window has none)."""
    _check_int("window", window)
    half = window // 2
    windows = (values[max(0, t - half): t + half + 1] for t in range(len(values)))
    return [min((v for v in window if not math.isnan(v)), default=math.nan) for window in windows]


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over all rows; (B, T, V) logits are flattened to (B·T, V) with labels (B, T)."""
    if logits.ndim > 2:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    return F.cross_entropy(logits, labels)


def find_lr(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[Any], *, num_steps: int = 30,
            initial_lr: float | None = None, rounds: int = 6, rtol: float = 0.05, window: int = 5,
            loss_fn: LossFn = cross_entropy, inputs_fn: InputsFn | None = None, logits_fn: LogitsFn | None = None,
            bound: BoundSpec = "ghost", method: str = "auto", probe_size: ProbeSize = None,
            aggregate: Aggregate | None = None, seed: int = 0, progress: Progress | None = None) -> LRFinderResult:
    """λ* = the largest base LR (param group 0's; every group is scaled alike) whose ``num_steps`` warm-up steps all
    have r = τ/ρ ≤ 1, searched in up to ``rounds`` rounds to within a factor 1 + ``rtol`` (docs/lr_finder.md).

    Batches are ``(inputs, labels)`` pairs unless ``inputs_fn(batch) -> (inputs, labels)``; ``logits_fn(model,
    inputs)`` and ``loss_fn(logits, labels)`` default to the model's logits and cross-entropy; ``bound``, ``method``,
    ``probe_size`` (default: every row, not SafeStep's 1/8) and ``aggregate`` are SafeStep's; ``progress(step)`` sees
    every LRStep. The model, its gradients, the optimizer and torch's global RNG are restored afterwards, also on
    error. Raises ValueError for an empty loader, a batch that is not a pair without ``inputs_fn``, an output that
    is not classification logits, a non-positive LR, or a count or tolerance out of range."""
    _check_int("num_steps", num_steps)
    _check_int("rounds", rounds)
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a finite positive number, got {rtol!r}")
    _check_int("window", window)
    base_lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else math.nan
    lr = base_lr if initial_lr is None else initial_lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"the initial learning rate must be finite and positive, got {lr!r}")
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"the optimizer's learning rate (param group 0) must be positive to be scaled, got {base_lr}")
    logits_fn = logits_fn or default_logits_fn
    run = functools.partial(_train_round, model, optimizer, loader, num_steps, base_lr, loss_fn,
                            inputs_fn or _split_pair, logits_fn, seed, progress)
    restore = _snapshot(model, optimizer)
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=cuda):
            guard = SafeStep(optimizer, model, mode="monitor", bound=bound, method=method, probe_size=probe_size,
                             probe_select="stride", aggregate=aggregate, logits_fn=logits_fn, capture=False,
                             history=1)
            return _search(run, guard, restore, float(lr), rounds, float(rtol), window)
    finally:
        restore()


def _search(run: Callable[[SafeStep, int, float], LRRound], guard: SafeStep, restore: Callable[..., None],
            lr: float, rounds: int, rtol: float, window: int) -> LRFinderResult:
    done: list[LRRound] = []
    aim = 1.0 / math.sqrt(1.0 + rtol)  # target max r: the middle of the accepted band [1/(1 + rtol), 1]
    for k in range(rounds):
        restore(guard)
        done.append(run(guard, k, lr))
        lo = max((r for r in done if r.verified), key=lambda r: r.lr, default=None)
        hi = min((r for r in done if not r.verified), key=lambda r: r.lr, default=None)
        if lo is not None and hi is None and lo.max_r == 0.0:
            return LRFinderResult(math.inf, True, tuple(done), window)
        if lo is not None and (lo.max_r * (1.0 + rtol) >= 1.0 or (hi is not None and hi.lr <= lo.lr * (1.0 + rtol))):
            break
        lr = _next_lr(lo, hi, aim)
    if lo is not None:
        return LRFinderResult(lo.lr, True, tuple(done), window)
    return LRFinderResult(lr, False, tuple(done), window)


def _next_lr(lo: LRRound | None, hi: LRRound | None, aim: float) -> float:
    """The next round's LR from the largest verified round ``lo`` and the smallest failed round ``hi``: λ·aim/max r
    with one side known (r ∝ λ on a fixed trajectory), else the secant through (log λ, log max r) hitting log aim,
    kept in the inner 80 % of the bracket (the geometric mean when a failed round had non-finite steps)."""
    if hi is None or (lo is None and math.isfinite(hi.max_r)):
        return (lo or hi).lr * aim / (lo or hi).max_r
    if lo is None:
        return hi.proposal * aim if hi.proposal < hi.lr else hi.lr / 10.0
    x_lo, x_hi = math.log(lo.lr), math.log(hi.lr)
    if not math.isfinite(hi.max_r) or lo.max_r == 0.0:
        return math.exp((x_lo + x_hi) / 2)
    y_lo, y_hi = math.log(lo.max_r), math.log(hi.max_r)
    x = x_lo + (math.log(aim) - y_lo) * (x_hi - x_lo) / (y_hi - y_lo)
    margin = 0.1 * (x_hi - x_lo)
    return math.exp(min(max(x, x_lo + margin), x_hi - margin))


def _train_round(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[Any], num_steps: int,
                 base_lr: float, loss_fn: LossFn, inputs_fn: InputsFn, logits_fn: LogitsFn, seed: int,
                 progress: Progress | None, guard: SafeStep, index: int, lr: float) -> LRRound:
    """Round ``index``: num_steps plain steps at the constant base LR ``lr``, measured by the monitoring ``guard``."""
    factor = lr / base_lr
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * factor
    torch.manual_seed(seed)
    steps = []
    for t, batch in enumerate(_cycle(loader, num_steps)):
        inputs, labels = inputs_fn(batch)
        guard.zero_grad(set_to_none=True)
        logits = _check_logits(logits_fn(model, inputs))
        loss = loss_fn(logits, labels)
        loss.backward()
        guard.step(inputs=inputs, labels=_class_labels(labels, logits))
        report = guard.last_report
        unmeasured = math.isnan(report.r_proposed)  # the monitor applied a step no radius describes
        ratio = report.r_proposed
        lr_safe = math.nan if unmeasured else (lr / ratio if ratio > 0 else math.inf)
        step = LRStep(index, t, lr, float(loss.detach()), report.tau, report.rho, ratio, lr_safe, unmeasured)
        steps.append(step)
        if progress is not None:
            progress(step)
    return LRRound(lr, tuple(steps))


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[..., None]:
    """Deep copies of the model's state dict, its gradients and the optimizer's state dict, and ``restore(into=None)``
    that copies them back into the live tensors and loads the optimizer state into ``into`` (default: ``optimizer``;
    a SafeStep wrapping it keeps its counters)."""
    model_state = copy.deepcopy(model.state_dict())
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    optimizer_state = copy.deepcopy(optimizer.state_dict())

    def restore(into: torch.optim.Optimizer | None = None) -> None:
        model.load_state_dict(model_state)
        for p, grad in grads:
            p.grad = None if grad is None else grad.clone()
        (into or optimizer).load_state_dict(copy.deepcopy(optimizer_state))

    return restore


def _cycle(loader: Iterable[Any], count: int) -> Iterator[Any]:
    """The first ``count`` batches of ``loader``, re-iterating it as often as needed."""
    produced = 0
    while produced < count:
        before = produced
        for batch in itertools.islice(loader, count - produced):
            yield batch
            produced += 1
        if produced == before:
            raise ValueError("the loader yielded no batches; find_lr needs at least one (inputs, labels) batch")


def _split_pair(batch: Any) -> tuple[Inputs, Any]:
    """(inputs, labels) from a two-element tuple/list batch."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(
        f"a batch must be an (inputs, labels) pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        + "; pass inputs_fn=lambda batch: (inputs, labels) for other batch types (e.g. dicts)"
    )


def _check_logits(logits: Any) -> Tensor:
    if not (isinstance(logits, Tensor) and logits.is_floating_point() and logits.ndim >= 2 and logits.shape[-1] >= 2):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"find_lr needs classification logits of shape (B, K) or (B, T, V) with K >= 2 classes, got {shape}; "
            "pass logits_fn=lambda model, inputs: ... if the logits are inside the model's output"
        )
    return logits


def _class_labels(labels: Any, logits: Tensor) -> Tensor | None:
    """The labels as class indices for the bound, or None when they are not one index per logits row."""
    if (isinstance(labels, Tensor) and not labels.is_floating_point()
            and labels.numel() * logits.shape[-1] == logits.numel()):
        return labels
    return None


def _check_int(name: str, value: Any, low: int = 1) -> None:
    """Raise ValueError unless ``value`` is an int (not a bool) >= ``low``; calibrate's counts use it too."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _positive(value: float) -> float:
    """value for a log axis: nan (a gap) when it is not a finite positive number; the CLI's plot uses it too."""
    return value if math.isfinite(value) and value > 0 else math.nan


def _standalone_figure(**options: Any) -> Figure:
    """A matplotlib Figure(**options) outside pyplot (no global state, no backend switch; save it with ``savefig``);
    ModuleNotFoundError naming the 'plot' extra without matplotlib. calibrate and the CLI draw on it too."""
    try:
        from matplotlib.figure import Figure
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError("plotting needs matplotlib: pip install 'safestep[plot]'", name=error.name) from error
    return Figure(**options)


def _axes(ax: Any) -> Any:
    """``ax``, or the Axes of a new standalone 7.5 × 4.5 in Figure (show it with ``ax.figure``, docs/lr_finder.md)."""
    return ax if ax is not None else _standalone_figure(figsize=(7.5, 4.5)).subplots()


def _finish(ax: Any, ylabel: str, title: str) -> Any:
    """``ax`` with a log y axis over the warm-up steps, its labels, legend and grid."""
    ax.set(yscale="log", xlabel="warm-up step", ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    ax.grid(True, which="both", alpha=0.3)
    return ax
