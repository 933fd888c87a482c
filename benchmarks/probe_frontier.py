"""Cost against certificate quality of every bound × probe budget × slope method SafeStep ships, per model.

Quality: a plain AdamW run trains each model; every ``--every`` steps the step it actually took is probed on the
*whole* batch, once with forward-mode AD (``method="jvp"``) and once with the one-sided difference against the
training forward's logits (``method="reuse"``: ``LogitProbe.along`` as the library calls it). The reference is
ρ*(whole batch) = min over every row of the exact radius of the JVP slopes (``Exact().min_radius``, i.e.
``min_exact_radius``). Each configuration's radius is the minimum over its probed rows of the bound's per-row
radius (ghost π/Δ_a, weighted R_w) from its method's slopes, on the rows SafeStep chooses for its budget ("mixed"
by default); ρ(config)/ρ*(whole batch) > 1 means it lets through steps beyond the whole batch's exact radius, < 1
means it is conservative. Reported: median and worst (largest) ratio over the probed steps. The reuse slopes are
taken on the whole batch and sliced (the workloads' rows are independent). A second table compares the row
choices ("mixed", "score", "stride") for the default bound and method.
Cost: guarded (bound, budget, method) against plain step time, every configuration interleaved in one run.

    python benchmarks/probe_frontier.py                     # every model (tens of minutes)
    python benchmarks/probe_frontier.py --quick             # the MLP, few steps
    python benchmarks/probe_frontier.py --json benchmarks/results/probe_frontier.json \
        --png docs/img/probe_frontier.png --update-docs     # the tables in docs/probe_budget.md
    python benchmarks/probe_frontier.py --cost-only --threads 2 --json cost2.json      # a second cost column:
    python benchmarks/probe_frontier.py --from-json benchmarks/results/probe_frontier.json --cost-json cost2.json \
        --png docs/img/probe_frontier.png --update-docs     # render a run's files again, no measuring
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from safestep import SafeStep
from safestep.bounds import Exact, Ghost, Weighted
from safestep.probe import SELECTIONS, LogitProbe, choose_rows, extract_logits, probe_count, row_scores
from safestep.update import displacement
from safestep_lab.io import write_json
from workloads import Workload, available, update_block, workload

BOUNDS = {"ghost": Ghost(), "weighted": Weighted()}  # the per-row bounds a subset can use
BUDGETS = (1 / 8, 1 / 4, None)
METHODS = ("jvp", "reuse")
REFERENCE = ("exact", None, "jvp")  # ρ*(whole batch): ratio 1 by definition
RULE_BUDGETS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # the row-choice comparison (ghost bound, JVP)
RULES = SELECTIONS  # row choice -> share of the budget chosen by score
MODELS = ("mlp", "transformer-3x128", "text-gpt-byte", "text-gpt-bpe")
DOCS_BLOCK = "frontier-table"  # the generated blocks' marker names
RULES_BLOCK = "frontier-rules"
QUICK_MODELS = ("mlp",)


def _label(budget: float | None) -> str:
    return "full" if budget is None else f"1/{round(1 / budget)}"


def configs() -> list[tuple[str, float | None, str]]:
    """Every (bound, budget, method) measured: the reference first, then bound × budget × method."""
    return [REFERENCE] + [(bound, budget, method) for bound in BOUNDS for budget in BUDGETS for method in METHODS]


def config_name(bound: str, budget: float | None, method: str) -> str:
    return f"{bound} {_label(budget)} {method}"


def ratio_summary(radii: list[float], reference: list[float]) -> dict[str, float]:
    """Median, worst (largest) and least of ρ(config)/ρ* over steps: ``radii[i] / reference[i]``."""
    ratios = [r / ref for r, ref in zip(radii, reference, strict=True)]
    return {"median": statistics.median(ratios), "worst": max(ratios), "least": min(ratios)}


def _rows_radius(per_row: torch.Tensor, rows: torch.Tensor | None) -> float:
    return float(per_row.min() if rows is None else per_row[rows].min())


def quality(work: Workload, steps: int, every: int) -> dict[str, Any]:
    """Per probed step: ρ*(whole batch) and the radius of every configuration and of every (rule, budget)."""
    model = work.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=work.lr)
    probe = LogitProbe(model, work.guard_options.get("logits_fn"))
    labels_fn = work.guard_options.get("labels_fn")
    params = list(model.parameters())
    radii: dict[str, list[float]] = {config_name(*c): [] for c in configs()}
    rules: dict[str, dict[str, list[float]]] = {_label(b): {rule: [] for rule in RULES} for b in RULE_BUDGETS}
    probed: list[int] = []
    for i in range(steps):
        inputs, targets = work.batch(i)
        optimizer.zero_grad(set_to_none=True)
        if i % every:
            work.loss(model, inputs, targets).backward()
            optimizer.step()
            continue
        captured: dict[str, torch.Tensor] = {}
        hook = model.register_forward_hook(
            lambda m, a, out, store=captured: store.__setitem__("z", extract_logits(out).detach()))
        work.loss(model, inputs, targets).backward()
        hook.remove()
        labels = labels_fn(inputs) if labels_fn is not None else targets
        theta0 = [p.detach().clone() for p in params]
        optimizer.step()
        step = displacement([p.detach() for p in params], theta0)  # Δθ, τ and ‖θ0‖ as the library forms them
        slopes = {"jvp": probe.along(params, step, inputs, "jvp"),
                  "reuse": probe.along(params, step, inputs, "reuse", reference=captured["z"])}
        batch = captured["z"].shape[0]
        exact = float(Exact().min_radius(slopes["jvp"].logits, slopes["jvp"].slopes, labels))
        radii[config_name(*REFERENCE)].append(exact)
        per_row = {(bound, method): rule.row_radii(s.logits, s.slopes, labels).reshape(batch, -1).amin(dim=1)
                   for bound, rule in BOUNDS.items() for method, s in slopes.items()}
        scores = row_scores(captured["z"], labels)
        for bound, budget, method in configs()[1:]:
            rows = choose_rows(batch, probe_count(batch, budget), scores, i, scored_share=RULES["mixed"])
            radii[config_name(bound, budget, method)].append(_rows_radius(per_row[bound, method], rows))
        for budget in RULE_BUDGETS:
            for rule, share in RULES.items():
                rows = choose_rows(batch, probe_count(batch, budget), scores, i, scored_share=share)
                rules[_label(budget)][rule].append(_rows_radius(per_row["ghost", "jvp"], rows))
        probed.append(i)
    return {"probed_steps": probed, "radii": radii, "rules": rules}


def cost(work: Workload, steps: int) -> dict[str, float]:
    """Guarded/plain median step time of every configuration, interleaved with the plain step (rotating order)."""
    reference = work.build()
    models: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
    for config in (None, *configs()):
        model = copy.deepcopy(reference)
        inner = torch.optim.AdamW(model.parameters(), lr=work.lr)
        if config is None:
            models["plain"] = (model, inner)
            continue
        bound, budget, method = config
        models[config_name(*config)] = (model, SafeStep(inner, model, bound=bound, probe_size=budget, method=method,
                                                         **work.guard_options))
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(steps + 2):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            work.step(*models[name], i)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    return {"plain_seconds": plain,
            **{name: statistics.median(t) / plain for name, t in times.items() if name != "plain"}}


def summarize(measured: dict[str, Any], costs: dict[str, float]) -> dict[str, Any]:
    radii = measured["radii"]
    reference = radii[config_name(*REFERENCE)]
    rows = []
    for bound, budget, method in configs():
        name = config_name(bound, budget, method)
        rows.append({"bound": bound, "budget": _label(budget), "method": method, "cost": costs[name],
                     **ratio_summary(radii[name], reference)})
    rules = [{"budget": budget, **{f"{rule}_{stat}": value for rule in RULES
                                   for stat, value in ratio_summary(by_rule[rule], reference).items()}}
             for budget, by_rule in measured["rules"].items()]
    return {"probed_steps": measured["probed_steps"], "plain_seconds": costs["plain_seconds"], "configs": rows,
            "rules": rules, "radii": radii}


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per model: worst (filled) and median (open) ρ(config)/ρ*(whole batch) against cost, one colour per bound."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    figure = Figure(figsize=(10, 3.2 * ((len(results) + 1) // 2)))
    axes_list = figure.subplots((len(results) + 1) // 2, 2, squeeze=False).ravel()
    colours = {"ghost": "C0", "weighted": "C1", "exact": "C3"}
    markers = {"jvp": "o", "reuse": "^"}
    for axes, (model, result) in zip(axes_list, results.items()):
        for row in result["configs"]:
            colour, marker = colours[row["bound"]], markers[row["method"]]
            axes.plot(row["cost"], row["worst"], marker, color=colour)
            axes.plot(row["cost"], row["median"], marker, color=colour, mfc="none", alpha=0.7)
            axes.annotate(row["budget"], (row["cost"], row["worst"]), fontsize=6, xytext=(3, 2),
                          textcoords="offset points")
        axes.axhline(1.0, color="black", lw=0.6)
        axes.axhline(1.5, color="grey", lw=0.8, ls=":")
        axes.set_xscale("log")
        axes.set_yscale("log")
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        rows = result["configs"]
        axes.set_xticks([t for t in (1, 1.5, 2, 3, 5, 10, 20, 50) if t <= 1.2 * max(r["cost"] for r in rows)])
        low, high = min(r["median"] for r in rows), max(r["worst"] for r in rows)
        axes.set_yticks([t for t in (0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10, 20) if low / 1.2 <= t <= 1.2 * high])
        axes.set_title(model, fontsize=9)
        axes.set_xlabel("guarded step time / plain step time (log)", fontsize=8)
        axes.set_ylabel("ρ(config) / ρ*(whole batch)", fontsize=8)
        axes.tick_params(labelsize=7)
    for axes in axes_list[len(results):]:
        axes.set_visible(False)
    handles = [Line2D([], [], color=c, marker="s", ls="", label=b) for b, c in colours.items()]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=f"method {k}") for k, m in markers.items()]
    handles += [Line2D([], [], color="grey", marker="o", ls="", label="worst step"),
                Line2D([], [], color="grey", marker="o", mfc="none", ls="", label="median step")]
    figure.legend(handles=handles, loc="lower center", ncol=7, fontsize=7, bbox_to_anchor=(0.5, -0.02))
    figure.suptitle("SafeStep: cost against ρ(config)/ρ*(whole batch), default row choice (labels: budget)",
                    fontsize=10)
    figure.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")


def markdown(meta: dict[str, Any]) -> str:
    """The main table; with a cost-only run beside it (``extra_cost``), its cost as a second column."""
    extra = meta.get("extra_cost")
    more = f" cost, {extra['threads']} threads |" if extra else ""
    lines = [f"| model | bound | budget | method | cost |{more} ρ/ρ*(batch): median | worst |",
             "|---|---|---|---|---|" + ("---|" if extra else "") + "---|---|"]
    for model, result in meta["results"].items():
        for row in result["configs"]:
            name = " ".join((row["bound"], row["budget"], row["method"]))  # config_name's key
            cell = ""
            if extra:
                value = extra["results"].get(model, {}).get(name)
                cell = f" {value:.2f}x |" if value is not None else " – |"
            lines.append(f"| {model} | {row['bound']} | {row['budget']} | {row['method']} | {row['cost']:.2f}x |"
                         f"{cell} {row['median']:.3g} | {row['worst']:.3g} |")
    return "\n".join(lines)


def markdown_rules(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | budget | " + " | ".join(f"{rule}: median / worst" for rule in RULES) + " |",
             "|---|---|" + "---|" * len(RULES)]
    for model, result in results.items():
        for row in result["rules"]:
            cells = " | ".join(f"{row[rule + '_median']:.2f} / {row[rule + '_worst']:.2f}" for rule in RULES)
            lines.append(f"| {model} | {row['budget']} | {cells} |")
    return "\n".join(lines)


def header(meta: dict[str, Any]) -> str:
    counts = ", ".join(f"{model} {len(result['probed_steps'])}" for model, result in meta["results"].items())
    extra = meta.get("extra_cost")
    second = (f"; second cost column: a cost-only run with {extra['threads']} threads (load at its end "
              f"{extra['load']})") if extra else ""
    return (f"torch {meta['torch']}, {meta['threads']} thread(s) on a {meta['cores']}-core machine shared with other "
            f"jobs (load average over 1 / 5 / 15 min at the end: {meta['load']}); AdamW; quality over "
            f"{meta['steps']} steps, every {meta['every']}th probed on the whole batch (probed steps: {counts}); "
            f"cost: median of {meta['cost_steps']} interleaved steps{second}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the MLP, 30 steps")
    parser.add_argument("--models", default=None, help=f"comma-separated workloads (default: {', '.join(MODELS)})")
    parser.add_argument("--steps", type=int, default=200, help="training steps of the quality run")
    parser.add_argument("--every", type=int, default=10, help="probe the whole batch every this many steps")
    parser.add_argument("--cost-steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="written after every model (partial results survive)")
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--update-docs", action="store_true", help="write the tables into docs/probe_budget.md")
    parser.add_argument("--cost-only", action="store_true",
                        help="measure the cost alone (--json gets the costs, to be shown beside a full run's)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="render the tables, figure and docs from a --json file of an earlier run (no measuring)")
    parser.add_argument("--cost-json", type=Path, default=None,
                        help="with --from-json: a --cost-only run's file, a second cost column (kept in --json)")
    args = parser.parse_args()
    if args.from_json:
        meta = json.loads(args.from_json.read_text(encoding="utf-8"))
        if args.cost_json:
            meta["extra_cost"] = json.loads(args.cost_json.read_text(encoding="utf-8"))
        if args.json:  # the run with its second cost column, in one file
            write_json(args.json, meta)
        report(meta, args.png, args.update_docs)
        return
    torch.set_num_threads(args.threads)
    names = QUICK_MODELS if args.quick else MODELS
    if args.models:
        names = tuple(args.models.split(","))
    steps, cost_steps = (30, 3) if args.quick else (args.steps, args.cost_steps)
    meta: dict[str, Any] = {"torch": torch.__version__, "threads": args.threads, "cores": os.cpu_count(),
                            "steps": steps, "every": args.every, "cost_steps": cost_steps, "results": {}}
    for name in names:
        if not available(name):
            print(f"skipping {name}: an optional package is missing", file=sys.stderr)
            continue
        started = time.perf_counter()
        work = workload(name)
        if args.cost_only:
            meta["results"][name] = cost(work, cost_steps)
            meta["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"  {name}: cost {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            if args.json:
                write_json(args.json, meta)
            continue
        measured = quality(work, steps, args.every)
        print(f"  {name}: quality {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        meta["results"][name] = summarize(measured, cost(work, cost_steps))
        meta["load"] = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"  {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        if args.json:
            write_json(args.json, meta)
    if args.cost_only:
        print(json.dumps(meta, indent=1))
        return
    report(meta, args.png, args.update_docs)


def report(meta: dict[str, Any], png: Path | None, update_docs: bool) -> None:
    """Print the tables; draw the figure and write the docs' generated blocks when asked."""
    print(header(meta) + "\n")
    print(markdown(meta) + "\n")
    print(markdown_rules(meta["results"]))
    if png:
        plot(meta["results"], png)
    if update_docs:
        docs = Path(__file__).resolve().parents[1] / "docs" / "probe_budget.md"
        update_block(docs, DOCS_BLOCK, header(meta) + "\n\n" + markdown(meta))
        update_block(docs, RULES_BLOCK, markdown_rules(meta["results"]))


if __name__ == "__main__":
    main()
