"""The ``safestep`` command line: ``demo``, ``list``, ``reproduce NAME|all`` and ``--version``.

Each subcommand is one ``_add_<name>`` function that registers its parser and its handler; add new ones there.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from . import __version__

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
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
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, the initialisation and the batches")
    parser.add_argument("--steps", type=_positive_int, default=400, help="training steps per run; the spike covers [steps/4, steps/2)")
    parser.add_argument("--quick", action="store_true", help="a few-second version (40 steps) for smoke tests")
    parser.add_argument(
        "--threads", type=_positive_int, default=1,
        help="torch CPU threads (default 1: these tiny models run fastest single-threaded, above all on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
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
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from .lab.experiments import REGISTRY, RunOptions, load
    from .lab.report import write_combined_report, write_result

    names = list(REGISTRY) if args.name == "all" else [args.name]
    try:
        experiments = [load(name) for name in names]
    except ValueError as error:
        print(f"safestep reproduce: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = []
    for exp in experiments:
        with tqdm(desc=exp.name, unit="unit", disable=args.no_progress) as bar:

            def advance(done: int, total: int, label: str, bar: tqdm = bar) -> None:
                bar.total = total
                bar.set_postfix_str(label, refresh=False)
                bar.update(done - bar.n)

            result = exp.run(RunOptions(quick=args.quick, seeds=args.seeds, progress=advance))
        paths = write_result(result, out / exp.name if len(experiments) > 1 else out, quick=args.quick)
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
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=_run_reproduce)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="safestep", description="Provably bounded training steps for cross-entropy models.")
    parser.add_argument("--version", action="version", version=f"safestep {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    _add_list(subparsers)
    _add_reproduce(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the chosen subcommand; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)
