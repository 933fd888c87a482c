"""The lab's commands of the ``safestep`` command line: ``demo``, ``list``, ``reproduce NAME|all`` and ``report``.

The library's CLI finds them through this distribution's entry point (group ``safestep.cli``) and calls
``register(subparsers)``. The handlers check, before any work, that the lab's dependencies are importable and that
their output folder can be written; a failed check raises the library's ``UsageError``, one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import importlib.util
import sys
from pathlib import Path

from safestep.cli import UsageError, check_out_dir, positive_int, seed, threads

__all__ = ["register"]

_DEPENDENCIES = ("sklearn", "matplotlib", "tqdm")
"""Import names of the lab's dependencies that its commands need (scikit-learn's digits, figures, progress bars)."""


def _require_dependencies() -> None:
    """Raise UsageError naming ``pip install -e lab`` unless every module of _DEPENDENCIES is importable."""
    missing = [name for name in _DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(
            f"this command needs the lab's dependencies (missing: {', '.join(missing)}); "
            "install them with: pip install -e lab"
        )


def _run_demo_lm(args: argparse.Namespace) -> int:
    """`safestep demo --lm`: the held x1000 spike on text (demo_lm.py)."""
    import torch
    from tqdm import tqdm

    from .demo_lm import LMDemoConfig, format_lm_table, run_lm_demo, write_lm_outputs
    from .parallel import default_workers

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
    _require_dependencies()
    check_out_dir(Path(args.out))
    if getattr(args, "lm", False):
        return _run_demo_lm(args)
    import torch
    from tqdm import tqdm

    from .demo import DemoConfig, format_table, run_demo, write_outputs

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
    parser.add_argument("--seed", type=seed, default=0, help="seed for the split, the initialisation and the batches")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, default=400, help="training steps per run; the spike covers [steps/4, steps/2)")
    length.add_argument("--quick", action="store_true", help="a few-second version (40 steps) for smoke tests")
    parser.add_argument(
        "--threads", type=threads, default=1,
        help="torch CPU threads (default 1: these tiny models run fastest single-threaded, above all on a busy machine)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--lm", action="store_true",
                        help="the language-model demo instead: a byte-level GPT on Python sources, AdamW with a held "
                        "x1000 LR spike for 30 steps, plain vs clip vs SafeStep (writes results.json, demo_lm.png, "
                        "report.md; the three runs use two worker processes on a multi-core machine)")
    parser.set_defaults(handler=_run_demo)


def _run_list(args: argparse.Namespace) -> int:
    from .experiments import REGISTRY, load

    rows = [("name", "paper", "full run", "--quick", "what it checks")]
    for name in REGISTRY:
        exp = load(name)
        rows.append((exp.name, exp.paper_ref, exp.full_time, exp.quick_time, exp.summary))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])
    return 0


def _run_reproduce(args: argparse.Namespace) -> int:
    _require_dependencies()
    from .experiments import REGISTRY, RunOptions, load

    names = list(REGISTRY) if args.name == "all" else [args.name]
    try:
        experiments = [load(name) for name in names]
    except ValueError as error:
        raise UsageError(str(error)) from None
    out = Path(args.out)
    folders = [out / exp.name for exp in experiments] if len(experiments) > 1 else [out]
    for folder in folders:
        check_out_dir(folder)
    import torch
    from tqdm import tqdm

    from .report import write_combined_report, write_result

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
    parser.add_argument("--seeds", type=positive_int, default=None, help="number of seeds (default: the experiment's)")
    parser.add_argument("--out", default="safestep-out", help="output folder (default: ./safestep-out)")
    parser.add_argument("--threads", type=threads, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.set_defaults(handler=_run_reproduce)


def _run_report(args: argparse.Namespace) -> int:
    from .experiments import REGISTRY
    from .report import load_results, replace_block, reproduction_table

    results = load_results(args.results)
    if not results:
        raise UsageError(f"no <experiment>/results.json under {args.results}")
    missing = [name for name in REGISTRY if name not in {payload["name"] for payload in results}]
    table = reproduction_table(results, folder=Path(args.results).as_posix(), missing=missing)
    if args.readme is None:
        print(table)
        return 0
    readme = Path(args.readme)
    text = readme.read_text(encoding="utf-8")
    demo = Path(args.demo)
    with_demo = demo.is_file() and "<!-- demo-table:start" in text
    blocks = _protocol_blocks(results)
    try:
        updated = _fill_blocks(replace_block(text, table), blocks)
        if with_demo:
            from .demo import README_BLOCK, format_table

            updated = replace_block(updated, format_table(json.loads(demo.read_text()), markdown=True), README_BLOCK)
    except ValueError as error:
        raise UsageError(f"{readme}: {error}") from None
    docs = Path(args.docs)
    docs_text = docs.read_text(encoding="utf-8") if docs.is_file() else None
    docs_updated = None if docs_text is None else _fill_blocks(docs_text, blocks)
    if args.check:
        stale = [str(path) for path, old, new in ((readme, text, updated), (docs, docs_text, docs_updated)) if old != new]
        if stale:
            print(f"{', '.join(stale)}: generated tables out of date; run: safestep report --readme {readme}",
                  file=sys.stderr)
            return 1
        return 0
    readme.write_text(updated, encoding="utf-8")
    if docs_updated is not None and docs_updated != docs_text:
        docs.write_text(docs_updated, encoding="utf-8")
    print(f"{readme}: reproduction table rewritten from {len(results)} results files in {args.results}"
          + (f", demo table from {demo}" if with_demo else "")
          + (f"; {len(blocks)} protocol tables in {readme} and {docs}" if blocks else ""))
    return 0


def _protocol_blocks(results: list[dict]) -> dict[str, str]:
    """The generated blocks of the committed lm-defaults protocols (full runs only), by marker name."""
    from .experiments.lm_defaults import generated_blocks

    return {key: block for payload in results if payload["name"].startswith("lm-defaults") and not payload.get("quick")
            for key, block in generated_blocks(payload).items()}


def _fill_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with every block of ``blocks`` whose markers it holds rewritten."""
    from .report import replace_block

    for name, block in blocks.items():
        if f"<!-- {name}:start" in text:
            text = replace_block(text, block, name)
    return text


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="the reproduction table (every claim: paper vs ours, verdict, seeds, command) from results files",
    )
    parser.add_argument("--results", default="lab/results",
                        help="folder of <experiment>/results.json (default: ./lab/results, the committed full runs)")
    parser.add_argument("--readme", default=None,
                        help="rewrite the table between this file's reproduction-table markers instead of printing it")
    parser.add_argument("--check", action="store_true", help="with --readme: only exit 1 if the table is out of date")
    parser.add_argument("--demo", default="lab/demo-results/results.json",
                        help="with --readme: also rewrite the demo table from this results.json of `safestep demo` "
                        "(default: the committed lab/demo-results/results.json, what `make demo` prints)")
    parser.add_argument("--docs", default="docs/language_models.md",
                        help="with --readme: also rewrite the lm-defaults tables of this file (default: %(default)s)")
    parser.set_defaults(handler=_run_report)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the lab's commands to the ``safestep`` parser (the ``safestep.cli`` entry point)."""
    _add_demo(subparsers)
    _add_list(subparsers)
    _add_reproduce(subparsers)
    _add_report(subparsers)
