"""What the language-model experiments share: the text, the model, the LR schedules, the methods and their runs.

* **Data and model.** The standard library's Python sources (``stdlib_corpus``), tokenized by bytes (V = 256) by
  default, and the lab's ``GPT`` built from the ``"byte"`` preset (2 layers, 4 heads, d = 64, T = 64,
  120,576 parameters): the issue's byte-level GPT-2, small enough for full runs on two CPU cores. Batches are
  ``text.sampler(16, 64, seed)``, so every method sees the same windows; validation is a fixed set of evenly
  spaced windows of the validation files.
* **Methods** (``Method``): ``plain`` AdamW; ``clip`` = ``clip_grad_norm_(1.0)``; ``zclip`` the z-score clipper
  and ``skip`` the loss-spike skipper of ``safestep_lab.lm_baselines``; ``safestep`` = ``SafeStep(AdamW, model,
  **options)`` with the options written out in the method (``probe_size`` and ``method`` always explicit). Any
  method can be *monitored*: a read-only ``SafeStep(mode="monitor")`` records τ, ρ and r of the step taken.
* **Schedules** (``Schedule``): a base LR with an optional held spike, linear warm-up and cosine decay.
* ``train_lm`` runs one (method, schedule, seed) on the lab's loop (``training.run_steps``) with the method's stepper
  and returns plain lists and numbers (picklable, JSON-ready).
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from safestep.norm import global_norm

from safestep.bounds import Belief, BoundSpec, Ghost, make_bound

from safestep.telemetry import StepReport

from ..lm import GPT, gpt_config, evaluate_lm, lm_loss
from ..lm_baselines import LossSpikeSkipper, ZScoreClipper
from ..text import TokenizedText, Windows, stdlib_corpus, tokenize_corpus
from ..training import Batch, StepRecord, run_steps

__all__ = ["LMSetup", "Schedule", "Method", "KINDS", "SAFESTEP_PROBE", "load_text", "validation", "build_model",
           "parse_bound", "train_lm", "sig", "median_curve", "final", "fmt", "issue_spike_numbers", "corpus_note",
           "curve_panels", "COLORS"]

KINDS = ("plain", "clip", "zclip", "skip", "safestep")
SAFESTEP_PROBE = {"probe_size": 16, "method": "jvp"}
"""The probe every guarded LM run passes explicitly: 16 batch rows (with B = 16 the whole batch: 16 × 64 = 1024
positions, each a row of V = 256 logits) and the exact JVP; ρ is the ghost bound's minimum over those rows."""


@dataclass(frozen=True)
class LMSetup:
    """Data, model and optimizer settings shared by every run of an experiment."""

    tokenizer: str = "byte"
    preset: str = "byte"
    batch_size: int = 16
    seq_len: int = 64
    val_windows: int = 256
    weight_decay: float = 0.01
    max_bytes: int | None = None  # corpus cap (None: the stdlib_corpus default, 16 MiB, i.e. all of it)

    def describe(self) -> str:
        """One sentence for the protocol."""
        return (f"{self.tokenizer}-level tokens of the running interpreter's standard-library sources "
                f"(split by file), GPT preset '{self.preset}' ({_model_sizes(self)}), batches of "
                f"{self.batch_size} random windows of {self.seq_len} tokens, validation on {self.val_windows} "
                f"evenly spaced windows of the validation files (token-weighted mean loss), AdamW (β = 0.9, 0.999, "
                f"ε = 1e-8, weight decay {self.weight_decay:g})")


def _model_sizes(setup: LMSetup) -> str:
    config = gpt_config(setup.preset, vocab_size=load_text(setup.tokenizer).vocab_size, seq_len=setup.seq_len)
    return (f"V = {config.vocab_size}, {config.n_layer} layers, {config.n_head} heads, d = {config.d_model}, "
            f"T = {config.seq_len}")


@lru_cache(maxsize=2)
def load_text(tokenizer: str = "byte") -> TokenizedText:
    """The standard-library corpus, tokenized (through the content-addressed cache; once per process)."""
    return tokenize_corpus(stdlib_corpus(), tokenizer)


@lru_cache(maxsize=4)
def validation(tokenizer: str, seq_len: int, windows: int) -> Windows:
    """The fixed validation windows."""
    return load_text(tokenizer).validation(seq_len, max_windows=windows)


def build_model(setup: LMSetup, seed: int) -> GPT:
    """GPT from the setup's preset, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return GPT(gpt_config(setup.preset, vocab_size=load_text(setup.tokenizer).vocab_size, seq_len=setup.seq_len))


def corpus_note(setup: LMSetup) -> str:
    """Where the text came from (the corpus depends on the Python version)."""
    meta = load_text(setup.tokenizer).meta
    return (f"Corpus: Python {meta.get('python')} standard library, {meta.get('train_files', '?')} train / "
            f"{meta.get('val_files', '?')} validation files, {meta['train_tokens']:,} train and "
            f"{meta['val_tokens']:,} validation tokens ({meta['tokenizer']}, V = {meta['vocab_size']}). "
            "Numbers from another Python version are not comparable (its standard library differs).")


@dataclass(frozen=True)
class Schedule:
    """η(t): linear warm-up over ``warmup`` steps to ``lr``, then constant, or cosine-decayed to ``min_ratio``·lr
    at ``total`` (when ``cosine``); times ``spike_factor`` for ``spike_start`` ≤ t < ``spike_start + spike_steps``."""

    lr: float
    spike_factor: float = 1.0
    spike_start: int = 0
    spike_steps: int = 0
    warmup: int = 0
    cosine: bool = False
    total: int = 0
    min_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        lr = self.lr
        if self.warmup and step < self.warmup:
            lr = self.lr * (step + 1) / self.warmup
        elif self.cosine:
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            lr = self.lr * (self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
        if self.spike_start <= step < self.spike_start + self.spike_steps:
            lr *= self.spike_factor
        return lr

    def describe(self) -> str:
        text = f"AdamW lr {self.lr:g}"
        if self.warmup:
            text += f", linear warm-up over {self.warmup} steps"
        if self.cosine:
            text += f", cosine decay to {self.min_ratio:g}·lr at step {self.total}"
        if self.spike_steps:
            text += f", ×{self.spike_factor:g} held for steps {self.spike_start}–{self.spike_start + self.spike_steps - 1}"
        return text


@dataclass(frozen=True)
class Method:
    """A named training method: ``kind`` (one of ``KINDS``) and its options as sorted (key, value) pairs.

    SafeStep options are the constructor's keywords; ``bound`` is a name, "belief:<rule>", or a tuple of these (their
    minimum). ``monitor`` (a tuple of (key, value) probe options) records τ, ρ and r of unguarded steps.
    """

    name: str
    kind: str
    options: tuple[tuple[str, Any], ...] = ()
    monitor: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "safestep":
            given = dict(self.options)
            missing = [key for key in ("probe_size", "method") if key not in given]
            if missing:
                raise ValueError(f"a SafeStep method must pass {', '.join(missing)} explicitly")

    @classmethod
    def safestep(cls, name: str, **options: Any) -> "Method":
        """SafeStep with ``options`` (r, mode, bound, probe_size, method, ...); cap, r = 1 unless given."""
        merged = {"r": 1.0, "mode": "cap", **options}
        return cls(name, "safestep", tuple(sorted(merged.items())))

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


def parse_bound(spec: Any) -> BoundSpec:
    """"ghost", "belief:<rule>", "exact" or a tuple of these → a bound for ``SafeStep(bound=...)``."""
    if isinstance(spec, (tuple, list)):
        return [parse_bound(s) for s in spec]
    if isinstance(spec, str) and spec.startswith("belief:"):
        return Belief(rule=spec.split(":", 1)[1])
    if spec == "ghost":
        return Ghost()
    return make_bound(spec)


def _guard(model: GPT, optimizer: torch.optim.Optimizer, options: dict[str, Any]) -> Any:
    from safestep import SafeStep

    options = dict(options)
    if "bound" in options:
        options["bound"] = parse_bound(options["bound"])
    return SafeStep(optimizer, model, **options)


@torch.no_grad()
def _norm(model: torch.nn.Module) -> float:
    """‖θ‖ over all parameters (float64 accumulation)."""
    return float(global_norm([p.detach() for p in model.parameters()]))


class _LMStepper:
    """The post-backward part of a step of a ``Method`` (a ``training.Stepper``): clip, z-score clip or skip, then
    the guard's step (every step when guarded, every ``monitor_every``-th when monitored) or AdamW's; returns the
    guard's report when it measured the step. ``acted`` lists the steps where a baseline clipped or skipped."""

    def __init__(self, method: Method, model: GPT, inner: torch.optim.Optimizer, guard: Any, monitor_every: int):
        self.method, self.model, self.inner, self.guard, self.monitor_every = method, model, inner, guard, monitor_every
        self.zclip = ZScoreClipper(**dict(method.options)) if method.kind == "zclip" else None
        self.skipper = LossSpikeSkipper(**dict(method.options)) if method.kind == "skip" else None
        self.clip_norm = float(method.option("max_norm", 1.0))
        self.acted: list[int] = []

    def __call__(self, batch: Batch) -> StepReport | None:
        action = 1.0
        if self.method.kind == "clip":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm)
        elif self.zclip is not None:
            action = self.zclip(self.model.parameters())
        report = None
        if self.skipper is not None and self.skipper.should_skip(batch.loss.item()):
            action = 0.0
        elif self.guard is not None and (self.method.kind == "safestep" or batch.step % self.monitor_every == 0):
            self.guard.step(inputs=batch.inputs, labels=batch.labels)
            report = self.guard.last_report
        else:
            self.inner.step()
        if action != 1.0:
            self.acted.append(batch.step)
        return report

    def counts(self) -> dict[str, int]:
        """How often the baseline acted: ``steps_clipped`` (z-score clipper) or ``steps_skipped`` (skipper)."""
        if self.zclip is not None:
            return {"steps_clipped": self.zclip.clipped}
        return {"steps_skipped": self.skipper.skipped} if self.skipper is not None else {}


def train_lm(setup: LMSetup, method: Method, schedule: Schedule, steps: int, seed: int, eval_every: int,
             keep_steps: bool = True, monitor_every: int = 1,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One run of the lab's loop (``training.run_steps``): the model from ``seed``, batches from ``sampler(seed)``,
    ``steps`` steps of ``method``.

    Returns the validation curve (before training and every ``eval_every`` steps, and at the end), the per-step
    training loss and, for guarded or monitored runs, τ, ρ, the applied scale and the binding bound per step (from
    the guard's reports); baselines record where they acted (clipped, skipped); ‖θ‖ at every evaluation. A monitored
    method is measured every ``monitor_every`` steps (NaN in between). A non-finite training loss ends the run
    (``diverged``; the final validation loss is then +inf). ``progress(step)`` is called after every step.
    """
    text = load_text(setup.tokenizer)
    valid = validation(setup.tokenizer, setup.seq_len, setup.val_windows)
    model = build_model(setup, seed)
    sampler = text.sampler(setup.batch_size, setup.seq_len, seed=seed)
    inner = torch.optim.AdamW(model.parameters(), lr=schedule(0), weight_decay=setup.weight_decay)
    guard = None
    if method.kind == "safestep":
        guard = _guard(model, inner, dict(method.options))
    elif method.monitor:
        guard = _guard(model, inner, {**dict(method.monitor), "mode": "monitor"})
    stepper = _LMStepper(method, model, inner, guard, monitor_every)
    val_steps, val_loss = [0], [evaluate_lm(model, valid, batch_size=64)]
    theta_norm = [_norm(model)]

    def after_step(record: StepRecord) -> None:
        if progress is not None:
            progress(record.step)
        if eval_every and (record.step + 1) % eval_every == 0 and record.step + 1 < steps:
            val_steps.append(record.step + 1)
            val_loss.append(evaluate_lm(model, valid, batch_size=64))
            theta_norm.append(_norm(model))

    started = time.perf_counter()
    records = run_steps(model, inner, stepper, sampler.batch, steps, loss_fn=lm_loss, lr_schedule=schedule,
                        after_step=after_step)
    diverged_at = records[-1].step if records and not math.isfinite(records[-1].loss) else None
    final_val = math.inf if diverged_at is not None else evaluate_lm(model, valid, batch_size=64)
    if diverged_at is None:
        val_steps.append(steps)
        val_loss.append(final_val)
        theta_norm.append(_norm(model))
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "method": method.name, "seed": seed, "steps": steps, "final_val_loss": final_val,
        "diverged": diverged_at is not None, "diverged_at": diverged_at, "seconds": seconds,
        "val_steps": val_steps, "val_loss": val_loss, "theta_norm": theta_norm,
    }
    stepped = records[:-1] if diverged_at is not None else records
    reports = [record.report for record in stepped]
    bounds = ["" if report is None else report.bound for report in reports]
    if keep_steps:  # per-step series for results.json: the training loss to 4 digits, the guard's numbers exact
        out["loss"] = [sig(record.loss, 4) for record in records]
        if guard is not None:
            out["tau"] = [math.nan if report is None else report.tau for report in reports]
            out["rho"] = [math.nan if report is None else report.rho for report in reports]
            out["scale"] = [math.nan if report is None else 0.0 if report.skipped else report.scale
                            for report in reports]
            if len(set(bounds) - {""}) > 1:
                out["bound"] = bounds
        if method.kind in ("zclip", "skip"):
            out["acted_at"] = stepper.acted  # steps the clipper clipped or the skipper skipped
    if guard is not None:
        out["binding_counts"] = dict(Counter(b for b in bounds if b))
    if guard is not None and method.kind == "safestep":
        out["steps_capped"] = sum(1 for report in reports if not report.skipped and 0.0 < report.scale < 1.0)
        out["steps_skipped"] = sum(1 for report in reports if report.skipped)
    out.update(stepper.counts())
    return out


def sig(value: float, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits (non-finite values unchanged): compact results.json."""
    return float(f"{value:.{digits}g}") if math.isfinite(value) else value


def median_curve(rows: list[list[float]]) -> list[float]:
    """Per-position median over runs of equal-length lists, ignoring NaN (NaN where none has a value)."""
    width = max(len(r) for r in rows)
    array = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        array[i, :len(row)] = row
    out = np.full(width, np.nan)
    have = np.isfinite(array).any(axis=0) | np.isinf(array).any(axis=0)
    with np.errstate(all="ignore"):
        out[have] = np.nanmedian(array[:, have], axis=0)
    return [sig(v) for v in out.tolist()]


def final(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of the final validation loss over runs, and the per-seed values."""
    values = [r["final_val_loss"] for r in runs]
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "per_seed": values, "diverged": sum(r["diverged"] for r in runs)}


def fmt(value: float) -> str:
    """A loss for a table: 3 significant digits, 'diverged' for +inf."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "diverged"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def issue_spike_numbers() -> dict[str, float]:
    """Issue 9's measured final validation losses (byte-level GPT-2, 2 layers, d = 64, ×1000 held 30 steps), as
    recorded in docs/reproduction.md ("Reference numbers that come from issue reports")."""
    return {"plain": 2100.0, "clip": 606.0, "safestep": 2.26, "safestep_no_spike": 2.25}


COLORS = {"plain": "tab:red", "clip": "tab:orange", "zclip": "tab:purple", "skip": "tab:brown",
          "safestep": "tab:blue", "safestep-p4": "tab:cyan"}


def curve_panels(panels: list[tuple[str, dict[str, tuple[list, list]]]], ylabel: str, suptitle: str,
                 logy: bool = True, shade: tuple[int, int] | None = None, colors: dict[str, str] | None = None):
    """One row of panels, each a title and {label: (x, y)} curves; ``shade`` marks an interval (the spike)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8 * len(panels), 4.2), constrained_layout=True)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    palette = {**COLORS, **(colors or {})}
    for ax, (title, curves) in zip(axes, panels):
        for label, (x, y) in curves.items():
            y = [v if v is not None and math.isfinite(v) else math.nan for v in y]
            ax.plot(x, y, marker="o", ms=2.5, lw=1.4, label=label, color=palette.get(label))
        if shade is not None:
            ax.axvspan(*shade, color="grey", alpha=0.15, lw=0)
        if logy:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(suptitle, fontsize=11)
    return fig
