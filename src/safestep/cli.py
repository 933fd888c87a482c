"""The ``safestep`` command line: ``plot``, ``calibrate``, ``--version``, and what installed distributions register
through the ``safestep.cli`` entry point group (``register(subparsers)``, with ``UsageError``, ``check_out_dir``,
``positive_int``, ``seed``, ``threads``): the lab's ``demo``, ``list``, ``reproduce NAME|all`` and ``report``, which
without it stop in one line saying how to install it. Every check (arguments, optional dependencies, the output
folder) runs before any work; a failed one raises ``UsageError``: one line on stderr, exit code 2."""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from . import __version__
from .lr_finder import _positive, _standalone_figure
from .telemetry import StepReport, read_reports

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["UsageError", "build_parser", "check_out_dir", "main", "positive_int", "seed", "threads"]

_N = TypeVar("_N", int, float)
_T = TypeVar("_T")


class UsageError(Exception):
    """A check failed before any work; ``main`` prints the message as one line and returns 2."""


def _require_plot() -> None:
    """Raise UsageError naming ``pip install 'safestep[plot]'`` unless matplotlib (the 'plot' extra) is importable."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("this command needs the 'plot' extra (missing: matplotlib); "
                         "install it with: pip install 'safestep[plot]'")


def check_out_dir(path: Path) -> None:
    """Raise UsageError unless ``path`` is a writable folder or can be created as one; creates nothing."""
    existing = path.absolute()
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write the output folder {path}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write the output folder {path}: no write permission in {existing}")


def _read(reader: Callable[..., _T], path: Path, **options: Any) -> _T:
    """``reader(path, **options)``, a file it cannot read or parse raised as UsageError."""
    try:
        return reader(path, **options)
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise UsageError(str(error)) from None


def _number_in(convert: Callable[[str], _N], low: float, high: float, meaning: str) -> Callable[[str], _N]:
    """An argparse type accepting a number ``convert(text)`` with low <= value < high (never nan)."""

    def parse(text: str) -> _N:
        error = argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}")
        try:
            value = convert(text)
        except ValueError:
            raise error from None
        if not low <= value < high:
            raise error
        return value

    return parse


_CPUS = os.cpu_count() or 1
positive_int = _number_in(int, 1, math.inf, "a positive integer")
seed = _number_in(int, 0, 2**64, "an integer in [0, 2**64)")
threads = _number_in(int, 1, _CPUS + 1, f"a number of threads from 1 to {_CPUS} (the CPUs of this machine)")
_share = _number_in(float, 0.0, 1.0, "a share in [0, 1), e.g. 0.05")
_factor = _number_in(float, 1.0, math.inf, "a factor >= 1, e.g. 1.5")

_LAB_COMMANDS = ("demo", "list", "reproduce", "report")
"""The commands the reproduction lab registers; without the lab each is a stand-in that says how to install it."""
_LAB_MISSING = ("this command is part of the reproduction lab, which is not installed; install it with: "
                "pip install -e lab (in a clone of the repository, or run: make demo)")
_NO_OPTIONS = "\0"
"""A stand-in's prefix characters: none that an argument starts with, so every option the lab knows is accepted."""


def _lab_missing(args: argparse.Namespace) -> int:
    """A lab command's stand-in: stop with how to install the lab, or why its installed entry point failed."""
    raise UsageError(f"the lab is installed but failed to load: {args.broken}" if args.broken else _LAB_MISSING)


def _add_entry_point_commands(subparsers: argparse._SubParsersAction) -> None:
    """Let every installed ``safestep.cli`` entry point ``register(subparsers)`` (one that fails to load cannot take
    the library's commands down); a lab command still missing gets a stand-in accepting any arguments."""
    broken = []
    for entry_point in entry_points(group="safestep.cli"):
        try:
            entry_point.load()(subparsers)
        except Exception as error:  # noqa: BLE001 - reported by the lab's commands, not by plot or calibrate
            broken.append(f"{entry_point.value}: {type(error).__name__}: {error}")
    for name in _LAB_COMMANDS:
        if name not in subparsers.choices:
            stand_in = subparsers.add_parser(name, help="(the reproduction lab: pip install -e lab)", add_help=False,
                                             prefix_chars=_NO_OPTIONS)
            stand_in.add_argument("arguments", nargs="*", help=argparse.SUPPRESS)
            stand_in.set_defaults(handler=_lab_missing, broken="; ".join(broken))


_PLOT_PANELS = (  # (y label, ((report field, legend), ...)), each on a log axis
    ("length", (("tau", "τ = ‖Δθ‖ (proposed)"), ("rho", "ρ (radius)"))),
    ("radius units", (("r_proposed", "r proposed = τ/ρ"), ("r_applied", "r applied = s·τ/ρ"))),
    ("scale s", (("scale", "s"),)),
)


def _history_figure(reports: Sequence[StepReport], title: str) -> Figure:
    """A standalone Figure (no pyplot) of τ and ρ, r proposed and applied, and the scale s per step (log axes);
    skipped steps are marked at the bottom of the scale panel. Non-finite and zero values leave gaps."""
    figure = _standalone_figure(figsize=(8, 7), layout="constrained")
    axes = figure.subplots(len(_PLOT_PANELS), 1, sharex=True)
    steps = [report.step for report in reports]
    axes[1].axhline(1.0, color="0.6", linewidth=0.8, linestyle="--", label="r = 1")
    skipped = [report.step for report in reports if report.skipped]
    if skipped:
        axes[2].plot(skipped, [0.0] * len(skipped), "x", color="tab:red", label="skipped", clip_on=False,
                     transform=axes[2].get_xaxis_transform())
    for ax, (ylabel, series) in zip(axes, _PLOT_PANELS):
        curves = [([_positive(getattr(report, field)) for report in reports], label) for field, label in series]
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
    _require_plot()
    history = Path(args.history)
    out = Path(args.out) if args.out is not None else history.with_suffix(".png")
    check_out_dir(out.parent)
    if out.is_dir() or out.absolute() == history.absolute():
        raise UsageError(f"cannot write the figure to {out}: give a new file name, e.g. --out steps.png")
    reports = _read(read_reports, history)
    if not reports:
        raise UsageError(f"{history} holds no step reports")
    out.parent.mkdir(parents=True, exist_ok=True)
    _history_figure(reports, history.name).savefig(out)
    print(f"wrote {out}")
    return 0


def _add_plot(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot", help="draw τ, ρ, r and the scale per step from a SafeStep history (CSV or JSON lines) to a PNG",
        description="Read a history written by History.to_csv/to_jsonl or the CSV/JSON-lines sinks and draw, per "
        "step, the proposed update length τ and the radius ρ, r = τ/ρ proposed and applied, and the scale s.")
    parser.add_argument("history", help="a .csv or .jsonl file of step reports")
    parser.add_argument("--out", default=None, help="the PNG to write (default: HISTORY with the suffix .png)")
    parser.set_defaults(handler=_run_plot)


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
        _require_plot()
        check_out_dir(out.parent)
        if out.is_dir():
            raise UsageError(f"cannot write the figure to {out}: give a file name, e.g. --out calibrate.png")
    import torch

    from .calibrate import Rule, calibrate, calibrate_history, load_target

    torch.set_num_threads(args.threads)
    rule = Rule(args.max_cap_share, args.max_overstatement, args.cheap_ratio)
    source = Path(args.source)
    if ":" in args.source and not source.is_file():
        try:
            entry = load_target(args.source)
        except ValueError as error:
            raise UsageError(str(error)) from None
        progress, close = _calibration_progress(args.no_progress)
        try:
            result = calibrate(entry, steps=args.steps, compare=args.compare, timing_steps=args.timing_steps,
                               rule=rule, progress=progress)
        finally:
            close()
    else:
        result = _read(calibrate_history, source, rule=rule)
    try:
        text = result.summary()
    except ValueError as error:  # no step had a finite r
        raise UsageError(str(error)) from None
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.figure().savefig(out)
        print(f"\nwrote {out}")
    return 0


def _add_calibrate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="recommend r and the probe from a short monitor-mode run of your training (or a history): "
        "quantiles of r, cap shares, probe vs whole batch, seconds per step, one figure",
        description="SOURCE is SCRIPT.py:FUNCTION or MODULE:FUNCTION, a function returning "
        "safestep.calibrate.CalibrationTarget(model, optimizer, train_step[, options]) (docs/calibrate.md), or a "
        "CSV/JSON-lines history of step reports from any integration. A run trains the target for "
        "2*TIMING_STEPS + 2 + STEPS ordinary steps of its optimizer (monitor mode never changes an update).")
    parser.add_argument("source", help="SCRIPT.py:FUNCTION, MODULE:FUNCTION, or a .jsonl/.csv history")
    parser.add_argument("--steps", type=positive_int, default=100,
                        help="monitored steps with the default probe (default 100)")
    parser.add_argument("--compare", type=_number_in(int, 0, math.inf, "a non-negative integer"), default=5,
                        help="of those, steps also measured with the whole batch along the same update (default 5)")
    parser.add_argument("--timing-steps", type=positive_int, default=5,
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
    parser.add_argument("--threads", type=threads, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true",
                        help="hide the progress bars (shown when tqdm is installed)")
    parser.set_defaults(handler=_run_calibrate)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="safestep",
                                     description="Provably bounded training steps for cross-entropy models.")
    parser.add_argument("--version", action="version", version=f"safestep {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plot(subparsers)
    _add_calibrate(subparsers)
    _add_entry_point_commands(subparsers)
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
    except UsageError as error:
        print(f"safestep {args.command}: error: {error}", file=sys.stderr)
        return 2
