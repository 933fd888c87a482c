"""Run the lab's full protocols as the README cites them, into lab/results/<name>/, resumably.

Each experiment runs its independent units in 2 worker processes (one torch thread each) and keeps every
finished unit in a cache folder, so an interrupted run picks up where it stopped. Prints each run's wall time.

    python lab/tools/full_runs.py                       # every experiment, in `safestep list` order
    python lab/tools/full_runs.py archgrid bottlenecks --workers 2 --cache lab/.lab-cache
    python lab/tools/full_runs.py archgrid --archgrid-spikes 10000   # a subset of the grid (still resumable)
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from tqdm import tqdm

from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments import archgrid
from safestep_lab.report import write_result

LAB = Path(__file__).resolve().parents[1]


def _archgrid_subset(spikes: list[float], options: RunOptions):
    started = time.perf_counter()
    config = dataclasses.replace(archgrid.FULL, spikes=tuple(spikes))
    runs = archgrid.run_grid(config, list(range(config.seeds)), options)
    result = archgrid.result_from_runs(runs, config, time.perf_counter() - started, quick=False)
    result.notes.append(f"Subset of the full grid: spikes {list(config.spikes)} only (and the no-spike runs).")
    result.command = "python lab/tools/full_runs.py archgrid --archgrid-spikes " + " ".join(f"{s:g}" for s in spikes)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"experiments (default: all of {', '.join(REGISTRY)})")
    parser.add_argument("--out", default=str(LAB / "results"), help="results folder (default: lab/results/)")
    parser.add_argument("--cache", default=str(LAB / ".lab-cache"), help="unit cache folder (default: lab/.lab-cache/)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: 2 on ≥ 2 cores)")
    parser.add_argument("--archgrid-spikes", type=float, nargs="+", default=None, help="run only these spikes")
    args = parser.parse_args(argv)
    for name in args.names or list(REGISTRY):
        experiment = load(name)
        started = time.perf_counter()
        with tqdm(desc=name, unit="cost", file=sys.stderr) as bar:

            def advance(done: int, total: int, label: str, bar: tqdm = bar) -> None:
                bar.total = total
                bar.set_postfix_str(label, refresh=False)
                bar.update(done - bar.n)

            cache = Path(args.cache) / name
            reused = len(list(cache.glob("*.pickle")))
            options = RunOptions(progress=advance, workers=args.workers, cache=str(cache))
            if name == "archgrid" and args.archgrid_spikes:
                result = _archgrid_subset(args.archgrid_spikes, options)
            else:
                result = experiment.run(options)
        if reused:
            result.notes.append(f"Assembled with up to {reused} unit(s) reused from an earlier, interrupted or "
                                "identical run's cache: the run time above covers this invocation only; the "
                                "measured wall time of the full run is in docs/reproduction.md.")
        write_result(result, Path(args.out) / name)
        print(f"{name}: {time.perf_counter() - started:.0f} s wall, verdicts "
              + ", ".join(c.verdict for c in result.claims), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
