"""`safestep demo --lm`: a held ×1000 learning-rate spike on text, plain AdamW vs clip_grad_norm_ vs SafeStep.

A byte-level GPT (the lab's ``"byte"`` preset: 2 layers, d = 64, V = 256) trains on the Python standard library's
sources with AdamW at lr 3e-3; for 30 steps the LR is multiplied by 1000. Every method starts from the same
initialisation and sees the same batches. Plain and clipped runs are *monitored* every ``monitor_every`` steps
(τ, ρ and r = τ/ρ measured, steps never changed), so r can be compared across methods. Outputs: results.json,
demo_lm.png and report.md, each written atomically (the digits demo's helpers).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch
from safestep.guard import DEFAULT_PROBE_SIZE

from .demo import METHOD_STYLES, R_LABELS, check_spike_window
from .io import json_ready, text_table, write_atomically, write_json, write_text

__all__ = ["LMDemoConfig", "LMDemoResult", "METHODS", "run_lm_demo", "format_lm_table", "write_lm_outputs"]

METHODS = ("plain", "clip", "safestep")
PROBE = {"bound": "ghost", "probe_size": DEFAULT_PROBE_SIZE, "method": "auto"}
"""``SafeStep(AdamW, model)``'s own defaults, written out (lm-defaults chose them): π/Δ_a on 1/8 of the rows."""


@dataclass(frozen=True)
class LMDemoConfig:
    """The LR is base_lr·spike_factor for spike_start ≤ step < spike_start + spike_steps, else base_lr."""

    steps: int = 400
    spike_start: int = 100
    spike_steps: int = 30
    spike_factor: float = 1000.0
    base_lr: float = 3e-3
    eval_every: int = 20
    monitor_every: int = 10
    val_windows: int = 128
    seed: int = 0
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        check_spike_window(self.steps, self.spike_start, self.spike_start + self.spike_steps, self.methods, METHODS)

    @classmethod
    def for_steps(cls, steps: int, seed: int = 0, quick: bool = False) -> "LMDemoConfig":
        """The standard LM demo scaled to ``steps``: a 30-step spike from steps/4; quick = 60 steps, 32 windows."""
        if quick:
            return cls(steps=60, spike_start=15, eval_every=15, monitor_every=5, val_windows=32, seed=seed)
        spike = min(30, max(1, steps // 4))
        return cls(steps=steps, spike_start=steps // 4, spike_steps=spike, eval_every=max(1, steps // 20),
                   monitor_every=max(1, steps // 40), seed=seed)


@dataclass
class LMDemoResult:
    """The configuration, one run record per method (see ``lm_common.train_lm``) and the wall time of all runs."""

    config: LMDemoConfig
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    corpus: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become the strings "nan", "inf" or "-inf"."""
        return json_ready({"config": asdict(self.config), "seconds": self.seconds, "torch_version": torch.__version__,
                           "corpus": self.corpus, "probe": PROBE,
                           "runs": [{"method": name, **run} for name, run in self.runs.items()]})


def _method(name: str, monitor: bool) -> Any:
    from .experiments.lm_common import Method

    watch = tuple(sorted(PROBE.items())) if monitor else ()
    if name == "plain":
        return Method("plain", "plain", monitor=watch)
    if name == "clip":
        return Method("clip", "clip", (("max_norm", 1.0),), monitor=watch)
    return Method.safestep("safestep", r=1.0, mode="cap", **PROBE)


def _setup(config: LMDemoConfig) -> Any:
    from .experiments.lm_common import LMSetup

    return LMSetup(val_windows=config.val_windows)


def _train(name: str, config: LMDemoConfig, tick: Callable[[int], None] | None = None) -> dict[str, Any]:
    """One method's run (module level, so that worker processes can run it)."""
    from .experiments.lm_common import Schedule, train_lm

    schedule = Schedule(config.base_lr, spike_factor=config.spike_factor, spike_start=config.spike_start,
                        spike_steps=config.spike_steps)
    return train_lm(_setup(config), _method(name, monitor=True), schedule, config.steps, config.seed,
                    config.eval_every, monitor_every=config.monitor_every, progress=tick)


def run_lm_demo(config: LMDemoConfig, progress: Callable[[int, str], None] | None = None,
                workers: int = 1) -> LMDemoResult:
    """Train every method of ``config``; progress(advance, label) is called as steps complete.

    With ``workers`` > 1 the methods run in that many single-threaded worker processes (progress then advances
    by a whole run at a time); each run is the same as in-process.
    """
    from .experiments.lm_common import load_text
    from .parallel import run_units

    meta = load_text(_setup(config).tokenizer).meta
    result = LMDemoResult(config, corpus={k: meta.get(k) for k in ("python", "train_files", "val_files",
                                                                   "train_tokens", "val_tokens", "tokenizer")})
    started = time.perf_counter()
    if workers > 1 and len(config.methods) > 1:
        reported = [0]

        def advance(done: int, total: int, label: str) -> None:
            if progress is not None:
                progress(done - reported[0], label.split(" (")[0])
            reported[0] = done

        runs = run_units(_train, [(name, config) for name in config.methods], workers, advance,
                         label=lambda unit: unit[0], cost=lambda unit: config.steps,
                         first=lambda unit: unit[0] == "safestep")  # the longest run starts first
        if progress is not None and reported[0] < len(config.methods) * config.steps:
            progress(len(config.methods) * config.steps - reported[0], "done")
        result.runs = dict(zip(config.methods, runs))
    else:
        for name in config.methods:
            tick = None if progress is None else (lambda step, name=name: progress(1, name))
            run = _train(name, config, tick)
            if progress is not None and len(run["loss"]) < config.steps:
                progress(config.steps - len(run["loss"]), name)
            result.runs[name] = run
    result.seconds = time.perf_counter() - started
    return result


def _r_proposed(run: dict[str, Any]) -> list[tuple[int, float]]:
    return [(step, tau / rho) for step, (tau, rho) in enumerate(zip(run.get("tau", []), run.get("rho", [])))
            if math.isfinite(tau) and math.isfinite(rho) and rho > 0]


def _val_at(run: dict[str, Any], step: int) -> float:
    """Validation loss at the last evaluation at or before ``step``."""
    pairs = [(s, v) for s, v in zip(run["val_steps"], run["val_loss"]) if s <= step]
    return pairs[-1][1] if pairs else math.nan


def _loss(value: float) -> str:
    if not math.isfinite(value):
        return "diverged" if value > 0 else "n/a"
    return f"{value:.3g}" if value < 1000 else f"{value:,.0f}"


def _table_rows(result: LMDemoResult) -> list[list[str]]:
    cfg = result.config
    rows = []
    for name, run in result.runs.items():
        ratios = [r for _, r in _r_proposed(run)]
        during = [r for s, r in _r_proposed(run) if cfg.spike_start <= s < cfg.spike_start + cfg.spike_steps]
        after = [v for s, v in zip(run["val_steps"], run["val_loss"]) if s > cfg.spike_start]
        capped = f"{run['steps_capped']}/{len(run['loss'])}" if name == "safestep" else "-"
        rows.append([
            name,
            _loss(_val_at(run, cfg.spike_start)),
            _loss(max(after) if after else math.nan),
            _loss(run["final_val_loss"]),
            f"{max(ratios):.3g}" if ratios else "n/a",
            f"{float(np.median(during)):.3g}" if during else "n/a",
            capped,
        ])
    return rows


_HEADER = ["method", "val loss before spike", "worst val loss after", "final val loss", "max r = τ/ρ",
           "median r in spike", "steps capped"]


def format_lm_table(result: LMDemoResult, markdown: bool = False) -> str:
    """The per-method summary as aligned text, or as a markdown table when ``markdown``."""
    return text_table(_HEADER, _table_rows(result), markdown)


def _plot(result: LMDemoResult, handle: IO[bytes]) -> None:
    from matplotlib.figure import Figure

    cfg = result.config
    fig = Figure(figsize=(7.5, 10))
    val_ax, loss_ax, r_ax = fig.subplots(3, 1, sharex=True)
    for name, run in result.runs.items():
        style = METHOD_STYLES[name]
        val_ax.plot(run["val_steps"], [v if math.isfinite(v) else math.nan for v in run["val_loss"]], marker="o",
                    ms=2.5, lw=1.6, label=name, **style)
        loss_ax.plot(range(len(run["loss"])), run["loss"], lw=0.8, label=name, **style)
        measured = _r_proposed(run)
        if measured:
            steps, ratios = zip(*measured)
            r_ax.plot(steps, ratios, lw=1.0, marker="." if name != "safestep" else None, label=R_LABELS[name], **style)
    r_ax.axhline(1.0, color="black", ls="--", lw=1, label="r = 1")
    for ax in (val_ax, loss_ax, r_ax):
        ax.axvspan(cfg.spike_start, cfg.spike_start + cfg.spike_steps, color="grey", alpha=0.15, lw=0)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    val_ax.set_ylabel("validation loss")
    loss_ax.set_ylabel("minibatch train loss")
    r_ax.set_ylabel("r = τ / ρ  (proposed step / radius)")
    r_ax.set_xlabel("step  (shaded: LR spike)")
    val_ax.legend(loc="upper left", fontsize=8)
    r_ax.legend(loc="upper right", fontsize=8)
    val_ax.set_title(f"Byte-level GPT on Python sources: AdamW {cfg.base_lr:g}, LR ×{cfg.spike_factor:g} for steps "
                     f"{cfg.spike_start}–{cfg.spike_start + cfg.spike_steps - 1}, seed {cfg.seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(handle, format="png", dpi=110)


def _report_markdown(result: LMDemoResult) -> str:
    cfg = result.config
    corpus = result.corpus
    return "\n".join([
        "# safestep demo --lm",
        "",
        f"Text: the Python {corpus.get('python')} standard library's sources as UTF-8 bytes ({corpus.get('train_files')} "
        f"training files, {corpus.get('train_tokens'):,} bytes; validation on {cfg.val_windows} windows of "
        f"{corpus.get('val_files')} held-out files). Model: the lab's byte-level GPT (2 layers, 4 heads, d = 64, "
        f"context 64, 120,576 parameters), batches of 16 × 64 bytes. AdamW (weight decay 0.01), base LR "
        f"{cfg.base_lr:g}, {cfg.steps} steps; the LR is multiplied by {cfg.spike_factor:g} for steps "
        f"{cfg.spike_start}–{cfg.spike_start + cfg.spike_steps - 1}. Every method starts from the same "
        "initialisation (seed "
        f"{cfg.seed}) and sees the same batches.",
        "",
        "- **plain**: AdamW as is. **clip**: `clip_grad_norm_(1.0)` before each step. **safestep**: "
        "`SafeStep(AdamW, model)` with the library's defaults (r = 1, cap, π/Δ_a on 2 of the 16 sequences: half "
        "the hardest by training cross-entropy, half a rotating stride): any step longer than the probed rows' "
        "radius ρ is shortened to ρ.",
        f"- r = τ/ρ: τ is the length of AdamW's step, ρ the convergence radius of the loss along it. Plain and clip "
        f"are measured every {cfg.monitor_every} steps without changing any step; for safestep every step, before "
        "capping (every applied step has r ≤ 1).",
        "",
        format_lm_table(result, markdown=True),
        "",
        *_held_back_note(result),
        f"Total time for all runs: {result.seconds:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} "
        "thread(s)).",
        "",
        "![validation loss, training loss and r per step](demo_lm.png)",
        "",
        "The full protocol (×10/×100/×1000, 3 seeds, z-score clipping and loss-spike skipping beside these three) is "
        "`safestep reproduce lm-spike`. Raw per-step records: `results.json`.",
        "",
    ])


def _held_back_note(result: LMDemoResult) -> list[str]:
    """A sentence when SafeStep ended the pre-spike phase clearly above plain AdamW (its cap held training back)."""
    cfg = result.config
    if not {"plain", "safestep"} <= set(result.runs):
        return []
    plain, guarded = (_val_at(result.runs[m], cfg.spike_start) for m in ("plain", "safestep"))
    if not guarded > 1.05 * plain:
        return []
    rho = [r for r in result.runs["safestep"]["rho"][:cfg.spike_start] if math.isfinite(r)]
    low = sum(r < 0.01 for r in rho)
    return [f"Before the spike safestep's validation loss ({_loss(guarded)}) is above plain AdamW's ({_loss(plain)}): "
            f"on this seed the cap held training back while nothing went wrong (ρ below 0.01 on {low} of the "
            f"{len(rho)} steps before the spike, smallest {min(rho):.2g}; r far above 1 in the bottom panel). "
            "docs/language_models.md (Experiments) measures how often this happens and why.", ""]


def write_lm_outputs(result: LMDemoResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json, demo_lm.png and report.md into ``out_dir`` (created if missing); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "demo_lm.png", "report.md")}
    write_json(paths["results.json"], result.to_dict())
    write_atomically(paths["demo_lm.png"], lambda h: _plot(result, h))
    write_text(paths["report.md"], _report_markdown(result))
    return paths
