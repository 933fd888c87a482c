"""Steepest-slope LR range test vs safestep.find_lr on sklearn digits (MLP 64→128→10, Adam, batch 64, CPU).

Per seed (model init + batch order):
1. Range test: LR grows exponentially from 1e-6 to 1 over 100 steps; the loss is recorded (and r = τ/ρ by a
   monitoring SafeStep). Two steepest-slope readings of the same curve, re-implemented from their documented
   rules: "torch-lr-finder" (loss smoothed as s ← 0.05·loss + 0.95·s, stop when s > 5·best, suggestion = the
   LR of the most negative np.gradient of s after skipping 10 first / 5 last points) and "Lightning"
   (bias-corrected EMA with β = 0.98, stop when s > 4·best, skip 10 first / 1 last point). Also reported:
   the LR at which r first exceeds 1 during the sweep.
2. find_lr: 30 warm-up steps, rounds from the initial LR 1e-3.
3. Training: 600 Adam steps (about 27 epochs) at each suggested constant LR from the same init and batches;
   test accuracy, final training loss, max r and the fraction of steps with r > 1 (first 30 / all steps).

    python benchmarks/lr_finder_compare.py            # seeds 0, 1, 2
    python benchmarks/lr_finder_compare.py --seeds 0  # one seed
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from safestep import SafeStep, find_lr
from safestep_lab.data import load_digits_split
from safestep_lab.models import MLP

BATCH = 64
SWEEP_STEPS, SWEEP_START, SWEEP_END = 100, 1e-6, 1.0
WARMUP = 30
TRAIN_STEPS = 600


def batches(x, y, seed, count):
    """``count`` minibatches of BATCH rows, reshuffled every epoch with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < count:
        perm = torch.randperm(len(y), generator=g)
        out += [(x[perm[i:i + BATCH]], y[perm[i:i + BATCH]]) for i in range(0, len(y) - BATCH + 1, BATCH)]
    return out[:count]


def train(seed, data, lrs):
    """Adam at base LR lrs[t] on data[t]; returns (losses, r per step, model). r from a monitoring SafeStep."""
    torch.manual_seed(seed)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=lrs[0])
    monitor = SafeStep(opt, model, r=sys.float_info.max, probe_size=None, capture=False, history=1)
    losses, rs = [], []
    for lr, (x, y) in zip(lrs, data):
        for group in opt.param_groups:
            group["lr"] = lr
        monitor.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        monitor.step(inputs=x, labels=y)
        losses.append(loss.item())
        rs.append(monitor.last_report.r)
    return losses, rs, model


def steepest(lrs, losses, smooth, diverge, skip_begin, skip_end):
    """LR at the most negative slope of the smoothed loss (per step = per log-LR increment) before divergence."""
    smoothed, best, avg = [], math.inf, 0.0
    for t, loss in enumerate(losses):
        if smooth == "ema":  # bias-corrected EMA, β = 0.98
            avg = 0.98 * avg + 0.02 * loss
            value = avg / (1 - 0.98 ** (t + 1))
        else:  # s ← f·loss + (1 − f)·s with f = smooth
            value = loss if t == 0 else smooth * loss + (1 - smooth) * smoothed[-1]
        if not math.isfinite(value) or value > diverge * best:
            break
        best = min(best, value)
        smoothed.append(value)
    window = np.asarray(smoothed[skip_begin:len(smoothed) - skip_end])
    return lrs[skip_begin + int(np.argmin(np.gradient(window)))]


def run_seed(seed, split):
    data = batches(split.x_train, split.y_train, seed, TRAIN_STEPS)
    sweep_lrs = [SWEEP_START * (SWEEP_END / SWEEP_START) ** (t / (SWEEP_STEPS - 1)) for t in range(SWEEP_STEPS)]
    sweep_losses, sweep_r, _ = train(seed, data, sweep_lrs)
    row = {
        "torch-lr-finder": steepest(sweep_lrs, sweep_losses, 0.05, 5.0, 10, 5),
        "Lightning": steepest(sweep_lrs, sweep_losses, "ema", 4.0, 10, 1),
        "sweep r>1": next((lr for lr, r in zip(sweep_lrs, sweep_r) if not r <= 1.0), math.nan),
    }
    torch.manual_seed(seed)
    model = MLP()
    start = time.perf_counter()
    result = find_lr(model, torch.optim.Adam(model.parameters(), lr=1e-3), data[:WARMUP], num_steps=WARMUP,
                     seed=seed)
    row["find_lr"] = result.suggestion
    row["find_lr seconds"] = time.perf_counter() - start
    row["find_lr rounds"] = len(result.rounds)
    row["find_lr verified"] = result.verified
    outcomes = {}
    for name in ("torch-lr-finder", "Lightning", "find_lr"):
        losses, rs, trained = train(seed, data, [row[name]] * TRAIN_STEPS)
        with torch.no_grad():
            accuracy = (trained(split.x_test).argmax(1) == split.y_test).float().mean().item()
        outcomes[name] = dict(
            accuracy=accuracy, final_loss=statistics.fmean(losses[-20:]), max_r=max(rs),
            warmup_over=sum(not r <= 1 for r in rs[:WARMUP]) / WARMUP, all_over=sum(not r <= 1 for r in rs) / len(rs),
        )
    return row, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    split = load_digits_split()
    for seed in args.seeds:
        row, outcomes = run_seed(seed, split)
        print(f"seed {seed}: suggestions  torch-lr-finder {row['torch-lr-finder']:.3g}  Lightning {row['Lightning']:.3g}"
              f"  first r>1 in sweep {row['sweep r>1']:.3g}  find_lr {row['find_lr']:.3g} "
              f"({row['find_lr rounds']} rounds, verified={row['find_lr verified']}, {row['find_lr seconds']:.1f} s)")
        for name, o in outcomes.items():
            print(f"  train {TRAIN_STEPS} steps at {name:<16} lr={row[name]:<9.3g} test acc {o['accuracy']:.3f}  "
                  f"final loss {o['final_loss']:.4f}  max r {o['max_r']:.3g}  "
                  f"r>1 in first {WARMUP}: {o['warmup_over']:.0%}  in all: {o['all_over']:.0%}")


if __name__ == "__main__":
    main()
