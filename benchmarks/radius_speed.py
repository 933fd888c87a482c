"""Speed of the certified exact radius and of the guard's spread hot path: medians over repeats beside the targets.

Run: python benchmarks/radius_speed.py [--repeats 7] [--seed 0] [--threads N]
Each case stops repeating after --budget seconds, so the script stays under a minute even on a busy machine;
the 1-minute load average is printed because other processes on a small machine inflate the timings.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from safestep.geometry.radius import exact_radius, min_exact_radius, radius_lower_bound, row_spread


def median_seconds(fn: Callable[[], object], repeats: int, budget: float) -> tuple[float, int]:
    """Median wall time of fn() over up to repeats calls (fewer once budget seconds are spent), after a warm-up."""
    fn()
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times)


def random_rows(rows: int, k: int, logit_scale: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(rows, k, generator=generator, dtype=torch.float64) * logit_scale
    slopes = torch.randn(rows, k, generator=generator, dtype=torch.float64)
    return logits, slopes


def masked(logits: torch.Tensor, slopes: torch.Tensor, fraction: float, generator: torch.Generator
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a random ``fraction`` of classes (−inf logits, NaN slopes), keeping each row's first class live."""
    drop = torch.rand(logits.shape, generator=generator) < fraction
    drop[..., 0] = False
    return logits.masked_fill(drop, -float("inf")), slopes.masked_fill(drop, float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--budget", type=float, default=8.0, help="seconds of timed calls per case at most")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    batch = random_rows(1024, 10, 3.0, generator)
    wide = random_rows(1, 1000, 3.0, generator)
    holes = masked(*batch, 0.3, generator)
    lm_slopes = torch.randn(2, 128, 50257, generator=generator).to(torch.bfloat16)
    lm_live = torch.rand(lm_slopes.shape, generator=generator) > 0.01
    cases = [
        ("exact_radius, 1024 rows x K=10", lambda: exact_radius(*batch), 1.0),
        ("exact_radius, 1024 rows x K=10, 30% masked", lambda: exact_radius(*holes), 1.0),
        ("min_exact_radius, 1024 rows x K=10", lambda: min_exact_radius(*batch), 0.05),
        ("exact_radius, 1 row x K=1000", lambda: exact_radius(*wide), 0.05),
        ("radius_lower_bound, 1024 rows x K=10 (reference)", lambda: radius_lower_bound(batch[1]), None),
        ("row_spread, 2x128x50257 bf16 (guard hot path)", lambda: row_spread(lm_slopes), None),
        ("row_spread, 2x128x50257 bf16, live mask", lambda: row_spread(lm_slopes, lm_live), None),
    ]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':<50} {'median':>10} {'runs':>5} {'target':>10}  status")
    for name, fn, target in cases:
        seconds, runs = median_seconds(fn, args.repeats, args.budget)
        status = "-" if target is None else ("ok" if seconds <= target else "SLOW")
        target_text = "-" if target is None else f"{target * 1e3:.0f} ms"
        print(f"{name:<50} {seconds * 1e3:>7.1f} ms {runs:>5} {target_text:>10}  {status}")


if __name__ == "__main__":
    main()
