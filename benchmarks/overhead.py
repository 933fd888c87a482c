"""Cost of a SafeStep-guarded training step relative to a plain one, measured in one run on this machine.

A step = zero_grad + forward + cross-entropy + backward + (clip | guard) + Adam step, batch 128 of digits on CPU.
For each model, identical copies (same initial weights, same batches) run every configuration; the
configurations are interleaved step by step (rotating order) so machine noise hits all of them alike. Reported:
median step time of the plain copy and median(config)/median(plain) after warm-up.

Memory: "param copy" is analytic (the guard keeps θ0 while probing: one float copy of every parameter).
Measured with the torch profiler's allocator events (every malloc/free replayed in time order), guarded minus
plain: "update peak +" = peak live bytes during the optimizer step alone (θ0, Δθ, tangents, dual
activations, ...); "step peak +" = the same over the whole step (0 when the guard's transient memory stays
below the backward pass's own peak).

Probe cost (same interleaved loop, on a copy that is never updated): medians of a no-grad forward, a training
forward+backward and a full-batch JVP probe. A guarded full-batch-JVP step costs about plain + JVP, so
"full-JVP floor" = 1 + JVP/plain is the ratio no guard-side trimming can beat.

    python benchmarks/overhead.py            # all five models, 30 timed steps each (a few minutes)
    python benchmarks/overhead.py --quick    # small models only, 10 timed steps
    python benchmarks/overhead.py --threads 1   # fewer threads: steadier timings on a busy machine
    python benchmarks/overhead.py --models cnn-wide,transformer-deep   # chosen models only
    python benchmarks/overhead.py --threads 1 --clock cpu   # CPU time of the process: steadiest under load
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from safestep.guard import SafeStep
from safestep.probe import LogitProbe
from safestep.lab.data import load_digits_split
from safestep.lab.models import build_model

SMALL_MODELS = ("mlp", "cnn", "transformer")
COMPUTE_BOUND_MODELS = ("cnn-wide", "transformer-deep")
BATCH = 128
LR = 1e-3
TARGET_DEFAULT_COMPUTE_BOUND = 1.25
GOAL_DEFAULT_COMPUTE_BOUND = 1.10
TARGET_FULL_JVP = 1.9
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}

# configuration name -> SafeStep options (None = no guard)
CONFIGS: dict[str, dict | None] = {
    "plain": None,
    "clip": None,
    "default": {},
    "jvp-full": {"method": "jvp", "probe_size": None},
    "fd-full": {"method": "fd", "probe_size": None},
}

class Stepper:
    """One training step of ``model`` under ``config``: prepare (zero_grad, forward, CE, backward, clip), then update."""

    def __init__(self, model: nn.Module, config: str) -> None:
        adam = torch.optim.Adam(model.parameters(), lr=LR)
        options = CONFIGS[config]
        self.model = model
        self.clip = config == "clip"
        self.optimizer = adam if options is None else SafeStep(adam, model, **options)

    def prepare(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Gradients of the batch loss (clipped for the "clip" configuration)."""
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)

    def update(self) -> None:
        """The optimizer step (guarded or not)."""
        self.optimizer.step()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.prepare(x, y)
        self.update()


class ProbeCost:
    """Timed pieces of one model copy that is never updated: no-grad forward, forward+backward, full-batch JVP."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.probe = LogitProbe(model)
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        generator = torch.Generator().manual_seed(0)
        direction = {n: torch.randn(p.shape, generator=generator) for n, p in self.params.items()}
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in direction.values()]))
        self.direction = {n: d / norm for n, d in direction.items()}
        self.pieces: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
            "forward": self.forward, "forward+backward": self.forward_backward, "jvp": self.jvp,
        }

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """z(θ) under no_grad."""
        with torch.no_grad():
            self.model(x)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """∇ CE(z(θ), y) (the plain step without the optimizer)."""
        self.model.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()

    def jvp(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """z(θ) and J_z(θ)·v on the whole batch, as the guard's full-batch JVP probe computes them."""
        self.probe(self.params, self.direction, x, "jvp")


def allocation_trace(run: Callable[[], None]) -> tuple[int, int]:
    """(peak, net) bytes of CPU allocations during ``run()``, relative to its start (torch profiler events).

    Replays every allocator event (+size on malloc, −size on free) in time order; ``net`` > 0 means memory
    still held when ``run`` returned. Uses the profiler's experimental event tree; returns (-1, -1) if this
    torch version does not provide it.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        from torch._C._profiler import _EventType

        pending = list(prof.profiler.kineto_results.experimental_event_tree())
    except (ImportError, AttributeError):
        return -1, -1
    events = []
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak, live


def memory_extra(steppers: dict[str, Stepper], x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, int]]:
    """Guarded minus plain peak bytes: of the optimizer step alone ("update") and of the whole step ("step")."""
    update, step = {}, {}
    for config, stepper in steppers.items():
        stepper.prepare(x, y)
        update[config] = allocation_trace(stepper.update)
        gc.collect()
        step[config] = allocation_trace(lambda: stepper(x, y))
        gc.collect()
    guarded = [c for c in CONFIGS if CONFIGS[c] is not None]
    return {
        "update": {c: update[c][0] - update["plain"][0] for c in guarded},
        "step": {c: step[c][0] - step["plain"][0] for c in guarded},
    }


def bench_model(name: str, warmup: int, timed: int, xs: torch.Tensor, ys: torch.Tensor,
                clock: Callable[[], float] = time.perf_counter) -> dict:
    """Interleaved medians (read on ``clock``) for every configuration on identical copies of model ``name``."""
    torch.manual_seed(0)
    reference = build_model(name)
    steppers = {c: Stepper(copy.deepcopy(reference), c) for c in CONFIGS}
    probe_cost = ProbeCost(copy.deepcopy(reference))
    jobs: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {**steppers, **probe_cost.pieces}
    times: dict[str, list[float]] = {job: [] for job in jobs}
    order = list(jobs)
    n_batches = xs.shape[0] // BATCH
    for i in range(warmup + timed):
        x, y = xs[(i % n_batches) * BATCH:][:BATCH], ys[(i % n_batches) * BATCH:][:BATCH]
        for job in order[i % len(order):] + order[: i % len(order)]:
            start = clock()
            jobs[job](x, y)
            elapsed = clock() - start
            if i >= warmup:
                times[job].append(elapsed)
    medians = {job: statistics.median(t) for job, t in times.items()}
    default_report = steppers["default"].optimizer.last_report
    return {
        "name": name,
        "params": sum(p.numel() for p in reference.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in reference.parameters()),
        "plain_ms": 1e3 * medians["plain"],
        "ratios": {c: medians[c] / medians["plain"] for c in CONFIGS if c != "plain"},
        "probe_ms": {piece: 1e3 * medians[piece] for piece in probe_cost.pieces},
        "memory": memory_extra(steppers, xs[:BATCH], ys[:BATCH]),
        "default_method": default_report.method,
        "default_probe": default_report.probe_size,
    }


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def print_table(rows: list[dict]) -> None:
    header = ["model", "params", "plain ms", "clip", "default", "jvp-full", "fd-full", "default ran", "param copy",
              "update peak + (default/jvp/fd)", "step peak +"]
    lines = [header]
    for row in rows:
        r = row["ratios"]
        memory = row["memory"]
        lines.append([
            row["name"], f"{row['params']:,}", f"{row['plain_ms']:.2f}",
            *(f"{r[c]:.2f}x" for c in ("clip", "default", "jvp-full", "fd-full")),
            f"{row['default_method']}, probe {row['default_probe']}",
            _kib(row["param_bytes"]),
            " / ".join(_kib(memory["update"][c]) for c in ("default", "jvp-full", "fd-full")),
            " / ".join(_kib(memory["step"][c]) for c in ("default", "jvp-full", "fd-full")),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for k, line in enumerate(lines):
        print("  ".join(cell.rjust(w) if k and i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def print_probe_cost(rows: list[dict]) -> None:
    print("\nProbe cost (ms, same run): a full-batch JVP against the model's own forward and backward")
    for row in rows:
        ms, plain = row["probe_ms"], row["plain_ms"]
        print(f"  {row['name']:>16}: forward {ms['forward']:.2f}, forward+backward {ms['forward+backward']:.2f}, "
              f"JVP {ms['jvp']:.2f} = {ms['jvp'] / ms['forward']:.2f}x forward = "
              f"{ms['jvp'] / ms['forward+backward']:.2f}x forward+backward; full-JVP floor 1 + JVP/plain = "
              f"{1 + ms['jvp'] / plain:.2f}x")


def print_targets(rows: list[dict]) -> None:
    def verdict(value: float, limit: float) -> str:
        return "meets" if value <= limit else "MISSES"

    print("\nTargets (ratio = guarded step time / plain step time, same run):")
    for row in rows:
        jvp = row["ratios"]["jvp-full"]
        print(f"  {row['name']:>16}: full-batch JVP {jvp:.2f}x {verdict(jvp, TARGET_FULL_JVP)} <= {TARGET_FULL_JVP}x")
        if row["name"] in COMPUTE_BOUND_MODELS:
            d = row["ratios"]["default"]
            goal = "meets" if d <= GOAL_DEFAULT_COMPUTE_BOUND else "misses"
            print(f"  {'':>16}  default {d:.2f}x {verdict(d, TARGET_DEFAULT_COMPUTE_BOUND)} <= "
                  f"{TARGET_DEFAULT_COMPUTE_BOUND}x ({goal} the {GOAL_DEFAULT_COMPUTE_BOUND}x goal)")
    print("  Reference controller on this kind of machine (REFERENCE.md §9): 2.4x-5.6x; clip_grad_norm_ about 1.03x.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models only, 3 warm-up + 10 timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per configuration (>= 30 for the report)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall = elapsed time; cpu = the process's CPU time (ignores time spent waiting for a "
                             "core on a shared machine; with --threads 1 it is the steadiest measure)")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated models (default: {', '.join(SMALL_MODELS + COMPUTE_BOUND_MODELS)})")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warmup, timed = (3, 10) if args.quick else (args.warmup, args.steps)
    models = SMALL_MODELS if args.quick else SMALL_MODELS + COMPUTE_BOUND_MODELS
    if args.models is not None:
        models = tuple(args.models.split(","))
    data = load_digits_split()
    print(f"torch {torch.__version__}, torch.get_num_threads() = {torch.get_num_threads()}, batch {BATCH}, "
          f"Adam lr {LR}, {warmup} warm-up + {timed} timed steps per configuration, interleaved, {args.clock} clock\n")
    rows = []
    for name in models:
        started = time.perf_counter()
        rows.append(bench_model(name, warmup, timed, data.x_train, data.y_train, CLOCKS[args.clock]))
        print(f"  measured {name} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print_table(rows)
    print_probe_cost(rows)
    print_targets(rows)


if __name__ == "__main__":
    main()
