"""Cost against certificate quality of SafeStep's probe budget, per model: the frontier between the two ends.

Quality: a plain AdamW run trains each model; every ``--every`` steps the step it actually took is probed on the
*whole* batch (forward-mode AD at θ0 along Δθ/τ) and every row's ghost radius is kept. For each budget (a share of
the batch rows) and each row choice ("score": the rows the training forward ranks hardest, as SafeStep chooses
them; "stride": a stride rotated by the step), ρ(subset)/ρ(full batch) is the factor by which the subset's
certificate overstates the batch's: 1 is exact. Reported: median and worst over the probed steps.
Cost: guarded (budget, default row choice) against plain step time, interleaved in one run.

    python benchmarks/probe_frontier.py                     # every model (tens of minutes)
    python benchmarks/probe_frontier.py --quick             # small classifiers, few steps
    python benchmarks/probe_frontier.py --json benchmarks/results/probe_frontier.json --png docs/img/probe_frontier.png \
        --update-docs                                       # the table in docs/probe_budget.md
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from safestep import SafeStep
from safestep.bounds import Ghost
from safestep.norm import global_norm
from safestep.probe import SELECTIONS, LogitProbe, choose_rows, extract_logits, probe_count, row_scores
from safestep_lab.io import write_json
from workloads import Workload, available, update_block, workload

BUDGETS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, None)
RULES = SELECTIONS  # row choice -> share of the budget chosen by score
MODELS = ("mlp", "cnn-48-96", "transformer-3x128", "text-gpt-byte", "text-gpt-bpe")
DOCS_BLOCK = "frontier-table"  # the generated block's marker name
QUICK_MODELS = ("mlp", "cnn-48-96")


def _label(budget: float | None) -> str:
    return "full" if budget is None else f"1/{round(1 / budget)}"


def quality(work: Workload, steps: int, every: int) -> dict[str, dict[str, list[float]]]:
    """ρ(subset)/ρ(full) per probed step, for every (budget, rule)."""
    model = work.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=work.lr)
    probe = LogitProbe(model, work.guard_options.get("logits_fn"))
    labels_fn = work.guard_options.get("labels_fn")
    ratios: dict[str, dict[str, list[float]]] = {_label(b): {rule: [] for rule in RULES} for b in BUDGETS}
    for i in range(steps):
        inputs, targets = work.batch(i)
        optimizer.zero_grad(set_to_none=True)
        if i % every:
            work.loss(model, inputs, targets).backward()
            optimizer.step()
            continue
        captured: dict[str, torch.Tensor] = {}
        hook = model.register_forward_hook(lambda m, a, out: captured.__setitem__("z", extract_logits(out).detach()))
        work.loss(model, inputs, targets).backward()
        hook.remove()
        labels = labels_fn(inputs) if labels_fn is not None else targets
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.step()
        delta = {n: p.detach() - theta0[n] for n, p in model.named_parameters()}
        tau = float(global_norm(list(delta.values())))
        slopes = probe(theta0, {n: d / tau for n, d in delta.items()}, inputs, "jvp")
        batch = slopes.logits.shape[0]
        row_labels = labels.reshape(batch, -1)
        per_row = Ghost().row_radii(slopes.logits, slopes.slopes, labels).reshape(batch, -1).amin(dim=1)
        full = float(per_row.min())
        scores = row_scores(captured["z"], labels)
        assert row_labels.shape[0] == batch
        for budget in BUDGETS:
            count = probe_count(batch, budget)
            for rule in RULES:
                rows = choose_rows(batch, count, scores, i, scored_share=RULES[rule])
                subset = full if rows is None else float(per_row[rows].min())
                ratios[_label(budget)][rule].append(subset / full)
    return ratios


def cost(work: Workload, steps: int) -> dict[str, float]:
    """Guarded/plain median step time for every budget (default row choice), interleaved with the plain step."""
    reference = work.build()
    configs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for name in ("plain", *(_label(b) for b in BUDGETS)):
        model = copy.deepcopy(reference)
        inner = torch.optim.AdamW(model.parameters(), lr=work.lr)
        budget = next((b for b in BUDGETS if _label(b) == name), None)
        configs[name] = (model, inner if name == "plain" else
                         SafeStep(inner, model, probe_size=budget, **work.guard_options))
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    for i in range(steps + 2):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            work.step(*configs[name], i)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    return {name: statistics.median(t) / plain for name, t in times.items() if name != "plain"}


def summarize(ratios: dict[str, dict[str, list[float]]], costs: dict[str, float]) -> list[dict]:
    return [{"budget": budget, "cost": costs[budget],
             **{f"{rule}_{stat}": fn(ratios[budget][rule]) for rule in RULES
                for stat, fn in (("median", statistics.median), ("worst", max))}}
            for budget in ratios]


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """Worst and median ρ(subset)/ρ(full) against cost, one colour per model."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.8))
    axes = figure.subplots()
    for index, (model, rows) in enumerate(results.items()):
        colour = f"C{index}"
        x = [row["cost"] for row in rows]
        axes.plot(x, [row["mixed_worst"] for row in rows], "o-", color=colour, label=f"{model}: worst step")
        axes.plot(x, [row["mixed_median"] for row in rows], "s--", color=colour, alpha=0.6, label=f"{model}: median")
        for row in rows:
            axes.annotate(row["budget"], (row["cost"], row["mixed_worst"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
    axes.axhline(1.5, color="grey", lw=0.8, ls=":")
    axes.set_xlabel("guarded step time / plain step time")
    axes.set_ylabel("ρ(probed rows) / ρ(whole batch)")
    axes.set_yscale("log")
    axes.set_title("SafeStep probe budget: cost against certificate quality (default row choice)")
    axes.legend(fontsize=7, ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def markdown(results: dict[str, list[dict]]) -> str:
    lines = ["| model | budget | cost | " + " | ".join(f"ρ ratio, {rule}: median / worst" for rule in RULES) + " |",
             "|---|---|---|" + "---|" * len(RULES)]
    for model, rows in results.items():
        for row in rows:
            cells = " | ".join(f"{row[rule + '_median']:.2f} / {row[rule + '_worst']:.2f}" for rule in RULES)
            lines.append(f"| {model} | {row['budget']} | {row['cost']:.2f}x | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small classifiers, 60 steps")
    parser.add_argument("--models", default=None, help=f"comma-separated workloads (default: {', '.join(MODELS)})")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the quality run")
    parser.add_argument("--every", type=int, default=10, help="probe the whole batch every this many steps")
    parser.add_argument("--cost-steps", type=int, default=12, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/probe_budget.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = QUICK_MODELS if args.quick else MODELS
    if args.models:
        names = tuple(args.models.split(","))
    steps, cost_steps = (60, 4) if args.quick else (args.steps, args.cost_steps)
    results: dict[str, list[dict]] = {}
    for name in names:
        if not available(name):
            print(f"skipping {name}: an optional package is missing", file=sys.stderr)
            continue
        started = time.perf_counter()
        work = workload(name)
        results[name] = summarize(quality(work, steps, args.every), cost(work, cost_steps))
        print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s), AdamW; quality over {steps} steps, every "
          f"{args.every}th probed in full\n")
    print(markdown(results))
    if args.json:
        write_json(args.json, {"steps": steps, "every": args.every, "threads": args.threads, "results": results})
    if args.png:
        plot(results, args.png)
    if args.update_docs:
        update_block(Path(__file__).resolve().parents[1] / "docs" / "probe_budget.md", DOCS_BLOCK,
                      f"{args.threads} thread(s), quality over {steps} steps, every {args.every}th probed in full.\n\n"
                      + markdown(results))


if __name__ == "__main__":
    main()
