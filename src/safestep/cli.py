"""The ``safestep`` command line: ``demo``, ``list``, ``reproduce NAME|all``, ``plot HISTORY``, ``report`` and
``--version``.

Each subcommand is one ``_add_<name>`` function that registers its parser and its handler; add new ones there.
Argparse checks every number; a handler then checks, before any work, that the optional dependencies it needs
are installed (``_require``) and that its output folder can be written (``_check_out_dir``). A failed check
raises ``_UsageError``, which ``main`` prints as one line on stderr with exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from . import __version__
from .telemetry import StepReport, read_reports

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["build_parser", "main"]

_EXTRAS: dict[str, tuple[str, ...]] = {"lab": ("sklearn", "matplotlib", "tqdm"), "plot": ("matplotlib",)}
"""The import names each optional extra of pyproject.toml provides, for the extras a command can need."""


class _UsageError(Exception):
    """A check failed before any work; ``main`` prints the message as one line and returns 2."""


def _require(extra: str) -> None:
    """Raise _UsageError naming ``pip install 'safestep[extra]'`` unless every module of ``extra`` is importable."""
    missing = [name for name in _EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise _UsageError(
            f"this command needs the '{extra}' extra (missing: {', '.join(missing)}); "
            f"install it with: pip install 'safestep[{extra}]'"
        )


def _check_out_dir(path: Path) -> None:
    """Raise _UsageError unless ``path`` is a writable folder or can be created as one; creates nothing."""
    existing = path.absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise _UsageError(f"cannot write the output folder {path}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _UsageError(f"cannot write the output folder {path}: no write permission in {existing}")


def _int_in(low: int, high: int | None, meaning: str) -> Callable[[str], int]:
    """An argparse type accepting an integer in [low, high] (no upper limit when ``high`` is None)."""

    def parse(text: str) -> int:
        error = argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}")
        try:
            value = int(text)
        except ValueError:
            raise error from None
        if value < low or (high is not None and value > high):
            raise error
        return value

    return parse


_CPUS = os.cpu_count() or 1
_positive_int = _int_in(1, None, "a positive integer")
_seed = _int_in(0, 2**64 - 1, "an integer in [0, 2**64)")
_threads = _int_in(1, _CPUS, f"a number of threads from 1 to {_CPUS} (the CPUs of this machine)")


def _run_demo_lm(args: argparse.Namespace) -> int:
    """`safestep demo --lm`: the held x1000 spike on text (src/safestep/lab/demo_lm.py)."""
    import torch
    from tqdm import tqdm

    from .lab.demo_lm import LMDemoConfig, format_lm_table, run_lm_demo, write_lm_outputs
    from .lab.parallel import default_workers

    torch.set_num_threads(args.threads)
    config = LMDemoConfig.for_steps(args.steps, seed=args.seed, quick=args.quick)
    total = len(config.methods) * config.steps
    with tqdm(total=total, desc="safestep demo --lm", unit="step", disable=args.no_progress) as bar:

        def advance(n: int, label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(n)

        result = run_lm_demo(config, progress=advance, workers=default_workers())
    paths = write_lm_outputs(result, args.out)
    print(
        f"byte-level GPT on Python sources, AdamW, base LR {config.base_lr:g}, LR x{config.spike_factor:g} for steps "
        f"{config.spike_start}-{config.spike_start + config.spike_steps - 1} of {config.steps}; seed {config.seed}; "
        f"{result.seconds:.1f} s\n"
    )
    print(format_lm_table(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    _require("lab")
    _check_out_dir(Path(args.out))
    if getattr(args, "lm", False):
        return _run_demo_lm(args)
    import torch
    from tqdm import tqdm

    from .lab.demo import DemoConfig, format_table, run_demo, write_outputs

    torch.set_num_threads(args.threads)
    config = DemoConfig.for_steps(args.steps, seed=args.seed, quick=args.quick)
    total = len(config.models) * len(config.methods) * config.steps
    with tqdm(total=total, desc="safestep demo", unit="step", disable=args.no_progress) as bar:

        def advance(n: int, label: str) -> None:
            bar.set_postfix_str(label, refresh=False)
            bar.update(n)

        result = run_demo(config, progress=advance)
    paths = write_outputs(result, args.out)
    print(
        f"Adam, base LR {config.base_lr:g}, LR x{config.spike_factor:g} for steps "
        f"{config.spike_start}-{config.spike_stop - 1} of {config.steps}; seed {config.seed}; "
        f"{torch.get_num_threads()} thread(s); {result.seconds:.1f} s\n"
    )
    print(format_table(result))
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="LR-spike demo on digits: plain Adam vs clip_grad_norm_ vs SafeStep (table, PNG, report.md)",
        description="Train an MLP+LayerNorm and a row transformer on digits with Adam and a held x10000 LR spike; "
        "compare plain, clip_grad_norm_(1.0) and SafeStep. Writes results.json, demo.png and report.md.",
    )
    parser.add_argument("--out", default="safestep-demo", help="output folder (default: ./safestep-demo)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed for the split, the initialisation and the batches")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=400, help="training steps per run; the spike covers [steps/4, steps/2)")
    length.add_argument("--quick", action="store_true", help="a few-second version (40 steps) for smoke tests")
    parser.add_argument(
        "--threads", type=_threads, default=1,
        help="torch CPU threads (default 1: these tiny models run fastest single-threaded, above all on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--lm", action="store_true",
                        help="the language-model demo instead: a byte-level GPT on Python sources, AdamW with a held "
                        "x1000 LR spike for 30 steps, plain vs clip vs SafeStep (writes results.json, demo_lm.png, "
                        "report.md; the three runs use two worker processes on a multi-core machine)")
    parser.set_defaults(handler=_run_demo)


def _run_list(args: argparse.Namespace) -> int:
    from .lab.experiments import REGISTRY, load

    rows = [("name", "paper", "full run", "--quick", "what it checks")]
    for name in REGISTRY:
        exp = load(name)
        rows.append((exp.name, exp.paper_ref, exp.full_time, exp.quick_time, exp.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _run_reproduce(args: argparse.Namespace) -> int:
    _require("lab")
    from .lab.experiments import REGISTRY, RunOptions, load

    names = list(REGISTRY) if args.name == "all" else [args.name]
    try:
        experiments = [load(name) for name in names]
    except ValueError as error:
        raise _UsageError(str(error)) from None
    out = Path(args.out)
    folders = [out / exp.name for exp in experiments] if len(experiments) > 1 else [out]
    for folder in folders:
        _check_out_dir(folder)
    import torch
    from tqdm import tqdm

    from .lab.report import write_combined_report, write_result

    torch.set_num_threads(args.threads)
    results = []
    for exp, folder in zip(experiments, folders):
        with tqdm(desc=exp.name, unit="unit", disable=args.no_progress) as bar:

            def advance(done: int, total: int, label: str, bar: tqdm = bar) -> None:
                bar.total = total
                bar.set_postfix_str(label, refresh=False)
                bar.update(done - bar.n)

            result = exp.run(RunOptions(quick=args.quick, seeds=args.seeds, progress=advance))
        paths = write_result(result, folder, quick=args.quick)
        results.append(result)
        print(f"\n{result.title} ({result.seconds:.1f} s)")
        for claim in result.claims:
            print(f"  [{claim.verdict}] {claim.claim}: paper {claim.paper} | ours {claim.ours}")
        print("  wrote " + ", ".join(str(p) for p in paths.values()))
    if len(experiments) > 1:
        print(f"\ncombined report: {write_combined_report(results, out, quick=args.quick)}")
    return 0


def _add_list(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="name every reproducible experiment with its paper reference and run times")
    parser.set_defaults(handler=_run_list)


def _add_reproduce(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="re-run a paper experiment (or all) and write results.json, figures and a paper-vs-ours report.md",
    )
    parser.add_argument("name", help="an experiment from `safestep list`, or `all`")
    parser.add_argument("--quick", action="store_true", help="the CI-sized variant (under a minute each)")
    parser.add_argument("--seeds", type=_positive_int, default=None, help="number of seeds (default: the experiment's)")
    parser.add_argument("--out", default="safestep-out", help="output folder (default: ./safestep-out)")
    parser.add_argument("--threads", type=_threads, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=_run_reproduce)


_PLOT_PANELS = (  # (y label, ((report field, legend), ...)), each on a log axis
    ("length", (("tau", "τ = ‖Δθ‖ (proposed)"), ("rho", "ρ (radius)"))),
    ("radius units", (("r_proposed", "r proposed = τ/ρ"), ("r_applied", "r applied = s·τ/ρ"))),
    ("scale s", (("scale", "s"),)),
)


def _plottable(value: float) -> float:
    """``value``, or NaN (a gap in the line) where a log axis cannot show it: non-finite or <= 0."""
    return value if math.isfinite(value) and value > 0 else math.nan


def _history_figure(reports: Sequence[StepReport], title: str) -> Figure:
    """A standalone Figure (no pyplot) of τ and ρ, r proposed and applied, and the scale s per step (log axes);
    skipped steps are marked at the bottom of the scale panel. Non-finite and zero values leave gaps."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 7), layout="constrained")
    axes = figure.subplots(len(_PLOT_PANELS), 1, sharex=True)
    steps = [report.step for report in reports]
    axes[1].axhline(1.0, color="0.6", linewidth=0.8, linestyle="--", label="r = 1")
    skipped = [report.step for report in reports if report.skipped]
    if skipped:
        axes[2].plot(skipped, [0.0] * len(skipped), "x", color="tab:red", label="skipped", clip_on=False,
                     transform=axes[2].get_xaxis_transform())
    for ax, (ylabel, series) in zip(axes, _PLOT_PANELS):
        curves = [([_plottable(getattr(report, field)) for report in reports], label) for field, label in series]
        for values, label in curves:
            ax.plot(steps, values, label=label)
        drawn = any(not math.isnan(value) for values, _ in curves for value in values)
        ax.set_yscale("log" if drawn else "linear")  # a log axis with nothing to draw cannot place its ticks
        ax.set_ylabel(ylabel)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    capped = sum(report.capped for report in reports)
    figure.suptitle(f"{title}: {len(reports)} steps, {capped} capped, {len(skipped)} skipped")
    return figure


def _run_plot(args: argparse.Namespace) -> int:
    _require("plot")
    history = Path(args.history)
    out = Path(args.out) if args.out is not None else history.with_suffix(".png")
    _check_out_dir(out.parent)
    if out.is_dir() or out.absolute() == history.absolute():
        raise _UsageError(f"cannot write the figure to {out}: give a new file name, e.g. --out steps.png")
    try:
        reports = read_reports(history)
    except OSError as error:
        raise _UsageError(f"cannot read {history}: {error.strerror or error}") from None
    except ValueError as error:
        raise _UsageError(str(error)) from None
    if not reports:
        raise _UsageError(f"{history} holds no step reports")
    out.parent.mkdir(parents=True, exist_ok=True)
    _history_figure(reports, history.name).savefig(out)
    print(f"wrote {out}")
    return 0


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw τ, ρ, r and the scale per step from a SafeStep history (CSV or JSON lines) to a PNG",
        description="Read a history written by History.to_csv/to_jsonl or the CSV/JSON-lines sinks and draw, per "
        "step, the proposed update length τ and the radius ρ, r = τ/ρ proposed and applied, and the scale s.",
    )
    parser.add_argument("history", help="a .csv or .jsonl file of step reports")
    parser.add_argument("--out", default=None, help="the PNG to write (default: HISTORY with the suffix .png)")
    parser.set_defaults(handler=_run_plot)


def _run_report(args: argparse.Namespace) -> int:
    from .lab.experiments import REGISTRY
    from .lab.report import load_results, replace_block, reproduction_table

    results = load_results(args.results)
    if not results:
        raise _UsageError(f"no <experiment>/results.json under {args.results}")
    missing = [name for name in REGISTRY if name not in {payload["name"] for payload in results}]
    table = reproduction_table(results, folder=Path(args.results).as_posix(), missing=missing)
    if args.readme is None:
        print(table)
        return 0
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    try:
        updated = replace_block(text, table)
    except ValueError as error:
        raise _UsageError(f"{readme}: {error}") from None
    if args.check:
        if updated != text:
            print(f"{readme}: the reproduction table is out of date; run: safestep report --readme {readme}",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(updated, encoding="utf-8")
    print(f"{readme}: reproduction table rewritten from {len(results)} results files in {args.results}")
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="the reproduction table (every claim: paper vs ours, verdict, seeds, command) from results files",
    )
    parser.add_argument("--results", default="results",
                        help="folder of <experiment>/results.json (default: ./results)")
    parser.add_argument("--readme", default=None,
                        help="rewrite the table between this file's reproduction-table markers instead of printing it")
    parser.add_argument("--check", action="store_true", help="with --readme: only exit 1 if the table is out of date")
    parser.set_defaults(handler=_run_report)


def _share(text: str) -> float:
    """An argparse type accepting a share in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), e.g. 0.05, got {text!r}")
    return value


def _factor(text: str) -> float:
    """An argparse type accepting a finite factor >= 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"expected a factor >= 1, e.g. 1.5, got {text!r}")
    return value


def _calibration_progress(disabled: bool) -> tuple[Callable[[str, int, int], None] | None, Callable[[], None]]:
    """(progress callback, close) for calibrate: a tqdm bar per phase when tqdm is installed and not ``disabled``."""
    if disabled or importlib.util.find_spec("tqdm") is None:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def advance(phase: str, done: int, total: int) -> None:
        if phase not in bars:
            bars[phase] = tqdm(total=total, desc=f"calibrate: {phase}", unit="step", leave=False)
        bars[phase].update(done - bars[phase].n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return advance, close


def _run_calibrate(args: argparse.Namespace) -> int:
    out = None if args.no_figure else Path(args.out)
    if out is not None:
        _require("plot")
        _check_out_dir(out.parent)
        if out.is_dir():
            raise _UsageError(f"cannot write the figure to {out}: give a file name, e.g. --out calibrate.png")
    import torch

    from .calibrate import Rule, calibrate, calibrate_history, load_target

    torch.set_num_threads(args.threads)
    rule = Rule(args.max_cap_share, args.max_overstatement, args.cheap_ratio)
    source = Path(args.source)
    if ":" in args.source and not source.is_file():
        try:
            entry = load_target(args.source)
        except ValueError as error:
            raise _UsageError(str(error)) from None
        progress, close = _calibration_progress(args.no_progress)
        try:
            result = calibrate(entry, steps=args.steps, compare=args.compare, timing_steps=args.timing_steps,
                               rule=rule, progress=progress)
        finally:
            close()
    else:
        try:
            result = calibrate_history(source, rule=rule)
        except OSError as error:
            raise _UsageError(f"cannot read {source}: {error.strerror or error}") from None
        except ValueError as error:
            raise _UsageError(str(error)) from None
    try:
        text = result.summary()
    except ValueError as error:  # no step had a finite r
        raise _UsageError(str(error)) from None
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.figure().savefig(out)
        print(f"\nwrote {out}")
    return 0


def _add_calibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="recommend r and the probe from a short monitor-mode run of your training (or a history): "
        "quantiles of r, cap shares, probe vs whole batch, seconds per step, one figure",
        description="SOURCE is SCRIPT.py:FUNCTION or MODULE:FUNCTION, a function returning "
        "safestep.calibrate.CalibrationTarget(model, optimizer, train_step[, options]) (docs/calibrate.md), or a "
        "CSV/JSON-lines history of step reports from any integration. A run trains the target for "
        "2*TIMING_STEPS + 2 + STEPS ordinary steps of its optimizer (monitor mode never changes an update).",
    )
    parser.add_argument("source", help="SCRIPT.py:FUNCTION, MODULE:FUNCTION, or a .jsonl/.csv history")
    parser.add_argument("--steps", type=_positive_int, default=100,
                        help="monitored steps with the default probe (default 100)")
    parser.add_argument("--compare", type=_int_in(0, None, "a non-negative integer"), default=5,
                        help="of those, steps also measured with the whole batch along the same update (default 5)")
    parser.add_argument("--timing-steps", type=_positive_int, default=5,
                        help="timed steps of the plain optimizer and of the whole-batch probe (default 5)")
    parser.add_argument("--max-cap-share", type=_share, default=0.05,
                        help="rule: the smallest r that caps at most this share of the steps (default 0.05)")
    parser.add_argument("--max-overstatement", type=_factor, default=1.5,
                        help="rule: probe the whole batch when the default probe's rho exceeds the whole batch's "
                        "by more than this factor on a compared step (default 1.5)")
    parser.add_argument("--cheap-ratio", type=_factor, default=1.1,
                        help="rule: ... or when the whole batch costs at most this factor of the default probe's "
                        "seconds per step (default 1.1)")
    parser.add_argument("--out", default="calibrate.png", help="the figure to write (default: ./calibrate.png)")
    parser.add_argument("--no-figure", action="store_true", help="print the report only (no matplotlib needed)")
    parser.add_argument("--threads", type=_threads, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars (shown when tqdm is installed)")
    parser.set_defaults(handler=_run_calibrate)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="safestep", description="Provably bounded training steps for cross-entropy models.")
    parser.add_argument("--version", action="version", version=f"safestep {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    _add_list(subparsers)
    _add_reproduce(subparsers)
    _add_plot(subparsers)
    _add_calibrate(subparsers)
    _add_report(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the chosen subcommand; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except _UsageError as error:
        print(f"safestep {args.command}: error: {error}", file=sys.stderr)
        return 2
