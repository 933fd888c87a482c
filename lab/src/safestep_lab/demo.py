"""The `safestep demo`: a held learning-rate spike on digits, plain Adam vs clip_grad_norm_ vs SafeStep.

Two small models (MLP+LayerNorm, RowTransformer) train with Adam at a base LR; for a window of steps the LR is
multiplied by a large factor. Each model starts from the same initialisation and sees the same minibatches under
every method. Plain and clipped runs are *monitored* (τ, ρ and r = τ/ρ measured, steps never shrunk), so r can be
compared across methods. Outputs: results.json, demo.png and report.md, each written atomically.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import torch

from .data import Split, load_digits_split
from .io import json_ready, text_table, write_atomically, write_json, write_text
from .models import build_model
from .training import StepRule, TrainResult, clipped, guarded, lr_spike, plain, train

__all__ = ["DemoConfig", "DemoResult", "run_demo", "format_table", "write_outputs", "METHODS", "METHOD_STYLES",
           "R_LABELS", "check_spike_window"]

# method name -> its step rule: plain and clipped runs are monitored (τ, ρ and r measured, steps never changed)
METHODS: dict[str, StepRule] = {"plain": plain(monitor={}), "clip": clipped(1.0, monitor={}), "safestep": guarded()}
_MODEL_TITLES = {"mlp-ln": "MLP+LayerNorm", "transformer": "RowTransformer"}
METHOD_STYLES = {
    "plain": {"color": "tab:red", "ls": "-"},
    "clip": {"color": "tab:orange", "ls": "--"},
    "safestep": {"color": "tab:blue", "ls": "-"},
}
R_LABELS = {"plain": "plain (measured only)", "clip": "clip (measured only)", "safestep": "safestep (proposed; applied r ≤ 1)"}


def check_spike_window(steps: int, start: int, stop: int, methods: Iterable[str], known: Iterable[str]) -> None:
    """Raise ValueError unless steps ≥ 1, 0 ≤ start ≤ stop ≤ steps and every method is a known one."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 <= start <= stop <= steps:
        raise ValueError(f"the spike window [{start}, {stop}) must lie inside [0, steps={steps}]")
    known = list(known)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {known}")


@dataclass(frozen=True)
class DemoConfig:
    """Demo settings; the LR is base_lr·spike_factor for spike_start ≤ step < spike_stop, else base_lr."""

    steps: int = 400
    spike_start: int = 100
    spike_stop: int = 200
    spike_factor: float = 1e4
    base_lr: float = 1e-3
    batch_size: int = 64
    eval_every: int = 10
    seed: int = 0
    models: tuple[str, ...] = ("mlp-ln", "transformer")
    methods: tuple[str, ...] = tuple(METHODS)

    def __post_init__(self) -> None:
        check_spike_window(self.steps, self.spike_start, self.spike_stop, self.methods, METHODS)

    @classmethod
    def for_steps(cls, steps: int, seed: int = 0, quick: bool = False) -> "DemoConfig":
        """The standard demo scaled to ``steps``: spike over [steps/4, steps/2); quick = 40 steps."""
        if quick:
            steps = 40
        base = cls(steps=steps, spike_start=steps // 4, spike_stop=steps // 2, seed=seed)
        return replace(base, eval_every=5) if quick else replace(base, eval_every=max(1, steps // 40))


@dataclass
class DemoResult:
    """The configuration, one TrainResult per (model, method), and the wall-clock time of all runs."""

    config: DemoConfig
    runs: dict[tuple[str, str], TrainResult] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become the strings "nan", "inf" or "-inf"."""
        payload = {
            "config": asdict(self.config),
            "seconds": self.seconds,
            "torch_version": torch.__version__,
            "runs": [{"model": m, "method": k, **res.to_dict()} for (m, k), res in self.runs.items()],
        }
        return json_ready(payload)


def run_demo(config: DemoConfig, progress: Callable[[int, str], None] | None = None) -> DemoResult:
    """Train every (model, method) pair of ``config``; progress(advance, label) is called as steps complete."""
    data: Split = load_digits_split(seed=config.seed)
    schedule = lr_spike(config.base_lr, config.spike_factor, config.spike_start, config.spike_stop)
    result = DemoResult(config)
    started = time.perf_counter()
    for model_name in config.models:
        for method in config.methods:
            label = f"{model_name}/{method}"
            torch.manual_seed(config.seed)
            model = build_model(model_name)
            run = train(
                model,
                lambda params: torch.optim.Adam(params, lr=config.base_lr),
                data,
                steps=config.steps,
                batch_size=config.batch_size,
                lr_schedule=schedule,
                rule=METHODS[method],
                seed=config.seed,
                eval_every=config.eval_every,
                progress=None if progress is None else (lambda record, label=label: progress(1, label)),
            )
            if progress is not None and len(run.steps) < config.steps:
                progress(config.steps - len(run.steps), label)
            result.runs[(model_name, method)] = run
    result.seconds = time.perf_counter() - started
    return result


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """One table row per run of a results payload (``DemoResult.to_dict()["runs"]``, or results.json's)."""
    rows = []
    for run in runs:
        method, max_r = run["method"], run["max_r"]
        capped = f"{run['steps_capped']}/{len(run['steps'])}" if method == "safestep" else "-"
        if run["steps_skipped"]:
            capped += f" (+{run['steps_skipped']} skipped)"
        diverged = f"yes (step {run['diverged_at']})" if run["diverged"] else "no"
        rows.append([
            _MODEL_TITLES.get(run["model"], run["model"]),
            method,
            f"{float(run['test_accuracy']):.3f}",
            f"{float(run['test_loss']):.3g}",
            "n/a" if max_r is None else f"{float(max_r):.3g}",
            capped,
            diverged,
        ])
    return rows


_HEADER = ["model", "method", "final test acc", "final test loss", "max r = τ/ρ", "steps capped", "diverged"]
README_BLOCK = "demo-table"  # README.md's generated block, written from lab/results/demo/results.json


def format_table(result: DemoResult | dict[str, Any], markdown: bool = False) -> str:
    """The per (model, method) summary of a run or of its results.json payload, as aligned text or markdown."""
    payload = result.to_dict() if isinstance(result, DemoResult) else result
    return text_table(_HEADER, table_rows(payload["runs"]), markdown)


def _plot(result: DemoResult, handle: IO[bytes]) -> None:
    from matplotlib.figure import Figure

    cfg = result.config
    models = list(dict.fromkeys(m for m, _ in result.runs))
    fig = Figure(figsize=(5.5 * len(models), 10))
    axes = fig.subplots(3, len(models), sharex=True, squeeze=False)
    for col, model_name in enumerate(models):
        acc_ax, loss_ax, r_ax = axes[:, col]
        acc_ax.set_title(f"{_MODEL_TITLES.get(model_name, model_name)}: Adam, LR ×{cfg.spike_factor:g} spike")
        for method in cfg.methods:
            run = result.runs.get((model_name, method))
            if run is None:
                continue
            style = METHOD_STYLES[method]
            suffix = f" (diverged at {run.diverged_at})" if run.diverged else ""
            acc_ax.plot([e.step for e in run.evals], [e.accuracy for e in run.evals], lw=1.6, label=method + suffix, **style)
            loss_ax.plot([s.step for s in run.steps], [s.loss for s in run.steps], lw=1.0, label=method, **style)
            proposed = [(s.step, s.r_proposed) for s in run.steps if s.r_proposed is not None]
            measured = [(step, r) for step, r in proposed if r > 0 and math.isfinite(r)]
            if measured:
                steps, ratios = zip(*measured)
                r_ax.plot(steps, ratios, lw=1.0, label=R_LABELS[method], **style)
        r_ax.axhline(1.0, color="black", ls="--", lw=1, label="r = 1")
        for ax in (acc_ax, loss_ax, r_ax):
            ax.axvspan(cfg.spike_start, cfg.spike_stop, color="grey", alpha=0.15, lw=0)
            ax.grid(alpha=0.3)
        acc_ax.set_ylim(0, 1.02)
        acc_ax.set_ylabel("test accuracy")
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("minibatch train loss")
        r_ax.set_yscale("log")
        r_ax.set_ylabel("r = τ / ρ  (proposed step / radius)")
        r_ax.set_xlabel("step  (shaded: LR spike)")
        acc_ax.legend(loc="center right", fontsize=8)
        r_ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"safestep demo on digits — base LR {cfg.base_lr:g}, ×{cfg.spike_factor:g} for steps "
        f"{cfg.spike_start}–{cfg.spike_stop - 1}, seed {cfg.seed}"
    )
    fig.tight_layout()
    fig.savefig(handle, format="png", dpi=110)


def _report_markdown(result: DemoResult) -> str:
    cfg = result.config
    return "\n".join([
        "# safestep demo",
        "",
        f"Digits (sklearn, 1438 train / 359 test, stratified split seed {cfg.seed}); Adam, base LR {cfg.base_lr:g}, "
        f"batch {cfg.batch_size}, {cfg.steps} steps; the LR is multiplied by {cfg.spike_factor:g} for steps "
        f"{cfg.spike_start}–{cfg.spike_stop - 1}. Every method starts from the same initialisation and sees the same batches.",
        "",
        "- **plain**: Adam as is. **clip**: `clip_grad_norm_(1.0)` before each Adam step. "
        "**safestep**: `SafeStep(Adam, model, r=1, mode=\"cap\")`, which shrinks any step longer than the radius ρ.",
        "- r = τ/ρ: τ is the length of the step Adam proposes, ρ the convergence radius of the softmax loss along it. "
        "For plain and clip, r is measured but no step is changed; for safestep, max r is that of the proposed step "
        "before capping (every applied step has r ≤ 1).",
        "- A run is *diverged* when its training loss became non-finite; training stops there.",
        "",
        format_table(result, markdown=True),
        "",
        f"Total time for all runs: {result.seconds:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} thread(s)).",
        "",
        "![accuracy, loss and r per step](demo.png)",
        "",
        "Raw per-step records: `results.json`.",
        "",
    ])


def write_outputs(result: DemoResult, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json, demo.png and report.md into ``out_dir`` (created if missing); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.json", "demo.png", "report.md")}
    write_json(paths["results.json"], result.to_dict())
    write_atomically(paths["demo.png"], lambda h: _plot(result, h))
    write_text(paths["report.md"], _report_markdown(result))
    return paths
