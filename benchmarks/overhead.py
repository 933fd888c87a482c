"""Cost of a SafeStep-guarded training step relative to a plain one, measured in one run on this machine.

For every workload (benchmarks/workloads.py) identical copies run each configuration — plain, clip_grad_norm_(1.0),
SafeStep with its defaults, the same with finite differences (method="fd"), SafeStep over the whole batch
(probe_size=None) with the JVP, and over the whole batch with method="reuse" (one forward against the training
forward's logits) for the ghost and the weighted bound — interleaved step by
step in a rotating order, so machine noise hits all of them alike. Per configuration: the median step time and
its ratio to plain; for the two SafeStep configurations also the extra peak memory of the optimizer step (the
torch profiler's allocator events replayed in time order, guarded minus plain) and the host reads per step made
by safestep's own code (``safestep.host_reads``). The whole table is measured once per thread count.

    python benchmarks/overhead.py                      # every workload, 1 and 2 threads (about 15 minutes)
    python benchmarks/overhead.py --quick              # small classifiers only, fewer steps
    python benchmarks/overhead.py --models gpt2-d128-v8192 --threads 2
    python benchmarks/overhead.py --json benchmarks/results/overhead.json --update-readme
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from safestep import SafeStep
from safestep.host_reads import HostReads
from safestep_lab.io import write_json
from workloads import WORKLOADS, Workload, available, update_block, workload

CONFIGS = ("plain", "clip", "default", "default-fd", "full-batch", "full-reuse", "full-weighted-reuse")
GUARDED = CONFIGS[2:]
OPTIONS = {"default": {}, "default-fd": {"method": "fd"}, "full-batch": {"probe_size": None},
           "full-reuse": {"probe_size": None, "method": "reuse"},
           "full-weighted-reuse": {"probe_size": None, "method": "reuse", "bound": "weighted"}}
QUICK_MODELS = ("mlp", "row-transformer", "cnn-48-96")
README_BLOCK = "overhead-table"  # the generated block's marker name


class Runner:
    """One model copy stepping under one configuration."""

    def __init__(self, work: Workload, model: torch.nn.Module, config: str) -> None:
        self.work, self.model, self.config = work, model, config
        inner = torch.optim.AdamW(model.parameters(), lr=work.lr)
        if config in GUARDED:
            options = {**work.guard_options, **OPTIONS[config]}
            self.optimizer: torch.optim.Optimizer = SafeStep(inner, model, **options)
        else:
            self.optimizer = inner

    def prepare(self, i: int) -> None:
        """Gradients of batch ``i`` (clipped for "clip")."""
        inputs, targets = self.work.batch(i)
        self.optimizer.zero_grad(set_to_none=True)
        self.work.loss(self.model, inputs, targets).backward()
        if self.config == "clip":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)

    def update(self) -> None:
        """The optimizer step, guarded or not."""
        self.optimizer.step()

    def __call__(self, i: int) -> None:
        self.prepare(i)
        self.update()


def allocation_peak(run: Callable[[], None]) -> int:
    """Peak bytes of CPU allocations live during ``run()`` relative to its start (profiler allocator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    from torch._C._profiler import _EventType

    pending, events = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def host_reads(runner: Runner, steps: int, offset: int) -> float:
    """Host reads per step made by safestep's code (the wrapped optimizer's own reads excluded)."""
    total = 0
    for i in range(steps):
        runner.prepare(offset + i)
        with HostReads() as reads:
            runner.update()
        total += reads.count("safestep")
    return total / steps


def bench(name: str, warmup: int, timed: int) -> dict:
    """Interleaved medians, memory and host reads of every configuration on copies of workload ``name``."""
    work = workload(name)
    reference = work.build()
    runners = {config: Runner(work, copy.deepcopy(reference), config) for config in CONFIGS}
    times: dict[str, list[float]] = {config: [] for config in CONFIGS}
    for i in range(warmup + timed):
        order = CONFIGS[i % len(CONFIGS):] + CONFIGS[:i % len(CONFIGS)]
        for config in order:
            start = time.perf_counter()
            runners[config](i)
            if i >= warmup:
                times[config].append(time.perf_counter() - start)
    median = {config: statistics.median(t) for config, t in times.items()}
    memory = {}
    for config in ("plain", *GUARDED):
        runners[config].prepare(0)
        memory[config] = allocation_peak(runners[config].update)
        gc.collect()
    guard = runners["default"].optimizer
    return {
        "model": name, "description": work.description,
        "params": sum(p.numel() for p in reference.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
        "plain_ms": 1e3 * median["plain"],
        "ratio": {config: median[config] / median["plain"] for config in CONFIGS[1:]},
        "extra_peak_bytes": {config: memory[config] - memory["plain"] for config in GUARDED},
        "host_reads": {config: host_reads(runners[config], 3, warmup + timed) for config in GUARDED},
        "default_probe": f"{guard.last_report.rows_probed} rows, {guard.last_report.method}",
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def markdown(results: dict[str, list[dict]]) -> str:
    """The README table: one row per (threads, model)."""
    lines = ["| threads | model | plain step | clip | SafeStep default | default, method=\"fd\" | whole batch, JVP | "
             "whole batch, reuse | whole batch, weighted + reuse | default probes | extra peak memory (default / whole "
             "batch JVP / reuse) | param size | host reads per step (default / weighted) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for threads, rows in results.items():
        for row in rows:
            ratio, extra = row["ratio"], row["extra_peak_bytes"]
            lines.append(
                f"| {threads} | {row['model']} | {row['plain_ms']:.1f} ms | {ratio['clip']:.2f}x | "
                f"**{ratio['default']:.2f}x** | {ratio['default-fd']:.2f}x | {ratio['full-batch']:.2f}x | "
                f"{ratio['full-reuse']:.2f}x | {ratio['full-weighted-reuse']:.2f}x | {row['default_probe']} | "
                f"{_mib(extra['default'])} / {_mib(extra['full-batch'])} / {_mib(extra['full-reuse'])} | "
                f"{_mib(row['param_bytes'])} | {row['host_reads']['default']:.0f} / "
                f"{row['host_reads']['full-weighted-reuse']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small classifiers only, 2 warm-up + 8 timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    parser.add_argument("--models", default=None, help=f"comma-separated workloads (default: {', '.join(WORKLOADS)})")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md's generated block")
    args = parser.parse_args()
    names = QUICK_MODELS if args.quick else tuple(WORKLOADS)
    if args.models:
        names = tuple(args.models.split(","))
    skipped = [n for n in names if not available(n)]
    if skipped:
        print(f"skipping {', '.join(skipped)}: needs transformers (pip install 'safestep[transformers]')", file=sys.stderr)
    warmup, timed = (2, 8) if args.quick else (args.warmup, args.steps)
    results: dict[str, list[dict]] = {}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        results[str(threads)] = []
        for name in (n for n in names if n not in skipped):
            started = time.perf_counter()
            results[str(threads)].append(bench(name, warmup, timed))
            print(f"  {name}, {threads} thread(s): {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    table = markdown(results)
    print(f"torch {torch.__version__}, AdamW, {warmup} warm-up + {timed} timed steps per configuration, interleaved\n")
    print(table)
    if args.json:
        write_json(args.json, {"torch": torch.__version__, "warmup": warmup, "timed": timed, "results": results})
    if args.update_readme:
        update_block(Path(__file__).resolve().parents[1] / "README.md", README_BLOCK, table)


if __name__ == "__main__":
    main()
