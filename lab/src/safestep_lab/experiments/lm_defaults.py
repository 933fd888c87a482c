"""Issue 19, lm-defaults: SafeStep's candidate defaults on a language model, judged by seeds and learning rates.

The byte-level GPT of ``lm_common`` (``LMSetup()``), 300 steps, seeds 0–4. Cells, in the order they are run (the most
important first, so a protocol cut short keeps them):

1. **calm**: constant AdamW LR 1e-3 / 3e-3 / 1e-2 / 3e-2, no spike: plain AdamW, ``clip_grad_norm_(1.0)``, the
   ZClip-style clipper and SafeStep candidates (cap, r = 1): ``ss-default`` (today's default: ghost bound π/Δ_a,
   probe 1/8 of the rows, ``probe_select="mixed"``), ``ss-weighted`` (R_w, whole batch), ``ss-weighted-p8`` (R_w,
   probe 1/8) and ``ss-ghost`` (π/Δ_a, whole batch: the known trap, run at the LRs where it was measured).
2. **spike**: ×10/×100/×1000 held 30 steps from step 100 at the tuned LR and 3× it, for the best candidates.
3. **cosine**: linear warm-up (30 steps) + cosine to 0.1·peak, peak at the tuned LR and 3× it.
4. **trap**: seed 0 at 3e-3 with a per-position analysis of the update every few steps: which row binds under π/Δ_a
   and under R_w, its label probability, its slope spread, and both radii of every row.

Each bar of the issue is computed by ``bars`` from the runs: per seed and in the median, with its margin.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..parallel import _cache_file, run_units
from ..report import Claim, ExperimentResult
from . import Experiment, RunOptions
from .lm_common import LMSetup, Method, Schedule, corpus_note, fmt, sig, train_lm

__all__ = [
    "BARS",
    "CANDIDATES",
    "EXPERIMENT",
    "FULL",
    "QUICK",
    "DefaultsConfig",
    "bars",
    "build_result",
    "choose_default",
    "collect",
    "generated_blocks",
    "methods",
    "phases",
    "readme_block",
    "run",
    "run_unit",
    "summarize",
    "trap_trace",
    "units",
    "write_outputs",
]

ZCLIP = {"z": 2.5, "alpha": 0.97}  # as lm-spike
CANDIDATES = ("ss-default", "ss-weighted", "ss-weighted-p8", "ss-ghost")
BASELINES = ("plain", "clip", "zclip")
TRAP_REFERENCE = ("monitor",)  # plain AdamW's trajectory through the trap analysis (ρ measured, never applied)
BARS = {"per_seed": 0.03, "spike": 0.05, "trap_steps": 50, "trap_scale": 0.1}


def methods(warmup: int = 25) -> dict[str, Method]:
    """Every method by name; SafeStep's options written out (cap, r = 1)."""
    return {
        "plain": Method("plain", "plain"),
        "clip": Method("clip", "clip", (("max_norm", 1.0),)),
        "zclip": Method("zclip", "zclip", tuple(sorted({**ZCLIP, "warmup": warmup}.items()))),
        # today's library default: ghost, probe 1/8 of the rows ("mixed" selection), method "auto" (the JVP here)
        "ss-default": Method.safestep("ss-default", bound="ghost", probe_size=0.125, method="auto"),
        "ss-weighted": Method.safestep("ss-weighted", bound="weighted", probe_size=None, method="jvp"),
        "ss-weighted-p8": Method.safestep("ss-weighted-p8", bound="weighted", probe_size=0.125, method="jvp"),
        "ss-ghost": Method.safestep("ss-ghost", bound="ghost", probe_size=None, method="jvp"),
        # plain AdamW's own trajectory, measured (never scaled): the trap analysis's reference
        "monitor": Method("monitor", "safestep", (("bound", "ghost"), ("method", "jvp"), ("mode", "monitor"),
                                                  ("probe_size", None))),
    }


@dataclass(frozen=True)
class DefaultsConfig:
    """The protocol: LRs, methods per cell kind, seeds, steps, spike and schedule settings, the trap analysis."""

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    calm_methods: tuple[str, ...] = BASELINES + CANDIDATES[:3]
    ghost_lrs: tuple[float, ...] = (3e-3, 1e-2)  # the trap reference only where the issue measured it (cost)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 300
    eval_every: int = 50
    tuned_lr: float = 1e-3  # plain AdamW's best constant LR at 300 steps (lm-calm; checked again by this protocol)
    spike_factors: tuple[float, ...] = (1000.0, 10.0, 100.0)  # in the order run
    spike_methods: tuple[str, ...] = CANDIDATES[:3] + BASELINES
    spike_start: int = 100
    spike_steps: int = 30
    cosine_methods: tuple[str, ...] = BASELINES + CANDIDATES[:3]
    warmup: int = 30
    min_ratio: float = 0.1
    trap_methods: tuple[str, ...] = ("ss-ghost", "ss-weighted")
    trap_lr: float = 3e-3
    trap_seed: int = 0
    trap_steps: int = 150
    trap_every: int = 3
    baseline_warmup: int = 25
    series_lrs: tuple[float, ...] = (3e-3,)  # calm cells whose per-step τ, ρ, scale are kept in results.json
    setup: LMSetup = field(default_factory=LMSetup)

    @property
    def lr_pairs(self) -> tuple[float, float]:
        """The tuned LR and 3× it (spikes and cosine peaks)."""
        return (self.tuned_lr, 3 * self.tuned_lr)

    def calm_at(self, lr: float) -> tuple[str, ...]:
        return self.calm_methods + (("ss-ghost",) if lr in self.ghost_lrs else ())


FULL = DefaultsConfig()
QUICK = DefaultsConfig(lrs=(1e-2, 3e-2), calm_methods=("plain", "ss-default", "ss-weighted"), ghost_lrs=(1e-2,),
                       seeds=(0,), steps=12, eval_every=12, tuned_lr=1e-2, spike_factors=(1000.0,),
                       spike_methods=("plain", "ss-weighted"), spike_start=4, spike_steps=4,
                       cosine_methods=("plain", "ss-weighted"), warmup=3, trap_lr=1e-2, trap_steps=8, trap_every=2,
                       baseline_warmup=3, setup=LMSetup(batch_size=4, seq_len=32, val_windows=8))
# The quick variant's tuned LR is 1e-2 so that its spike (at 1e-2 and 3e-2) sits on LRs of its calm grid.
BPE = DefaultsConfig(lrs=(1e-3, 3e-3, 1e-2), calm_methods=("plain", "ss-default", "ss-weighted-p8"), ghost_lrs=(),
                     steps=100, spike_factors=(1000.0,), spike_methods=("plain", "ss-default", "ss-weighted-p8"),
                     spike_start=40, spike_steps=20, cosine_methods=(), trap_methods=(), series_lrs=(),
                     setup=LMSetup(tokenizer="bpe", preset="bpe", batch_size=8, seq_len=128, val_windows=64))
"""The BPE cell (V = 8192, d = 128), cut to fit 2 cores: 5 seeds kept; 3 constant LRs, 100 steps, batches of 8,
64 validation windows, the ×1000 spike only (held for steps 40–59), no cosine and no trap trace; the whole-batch
candidates (3–5× the step) not run."""

Unit = tuple  # (kind, lr, factor, method, seed, config)


def phases(config: DefaultsConfig) -> list[list[Unit]]:
    """The units in batches, the most important first: calm at 3e-3 and 1e-2 (the trap's LRs) with the trap
    analysis, calm at 1e-3 and 3e-2, ×1000 spikes, the cosine schedule, then ×10 and ×100."""
    s = config.seeds
    calm = lambda lrs: [("calm", lr, 1.0, m, seed, config) for lr in lrs for m in config.calm_at(lr) for seed in s]
    first = [lr for lr in config.lrs if lr in config.ghost_lrs]
    rest = [lr for lr in config.lrs if lr not in config.ghost_lrs]
    spike = lambda factors: [("spike", lr, f, m, seed, config) for f in factors for lr in config.lr_pairs
                             for m in config.spike_methods for seed in s]
    traced = config.trap_methods + TRAP_REFERENCE if config.trap_methods else ()
    trap = [("trap", config.trap_lr, 1.0, m, config.trap_seed, config) for m in traced]
    cosine = [("cosine", lr, 1.0, m, seed, config) for lr in config.lr_pairs for m in config.cosine_methods
              for seed in s]
    return [b for b in (trap + calm(first), calm(rest), spike(config.spike_factors[:1]), cosine,
                        spike(config.spike_factors[1:])) if b]


def units(config: DefaultsConfig) -> list[Unit]:
    return [u for batch in phases(config) for u in batch]


def _schedule(kind: str, lr: float, factor: float, config: DefaultsConfig) -> Schedule:
    if kind == "spike":
        return Schedule(lr, spike_factor=factor, spike_start=config.spike_start, spike_steps=config.spike_steps)
    if kind == "cosine":
        return Schedule(lr, warmup=config.warmup, cosine=True, total=config.steps, min_ratio=config.min_ratio)
    return Schedule(lr)


def _stretch(flags: Sequence[bool]) -> int:
    """The longest run of consecutive True."""
    best = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


def run_unit(kind: str, lr: float, factor: float, method: str, seed: int, config: DefaultsConfig) -> dict[str, Any]:
    """One run; per-step series are reduced to the numbers the bars need (kept whole where ``series_lrs`` says)."""
    if kind == "trap":
        return trap_trace(method, config)
    out = train_lm(config.setup, methods(config.baseline_warmup)[method], _schedule(kind, lr, factor, config),
                   config.steps, seed, config.eval_every)
    row: dict[str, Any] = {"kind": kind, "lr_value": lr, "factor": factor, "method": method, "seed": seed,
                           **{k: out[k] for k in ("final_val_loss", "diverged", "diverged_at", "seconds", "val_steps",
                                                  "val_loss", "theta_norm")}}
    row["val_loss"] = [sig(v, 5) for v in row["val_loss"]]
    row["theta_norm"] = [sig(v, 4) for v in row["theta_norm"]]
    if "scale" in out and method.startswith("ss-"):
        scale = np.asarray(out["scale"], dtype=float)
        rho = np.asarray(out["rho"], dtype=float)
        tau = np.asarray(out["tau"], dtype=float)
        low = scale < BARS["trap_scale"]
        row.update({
            "steps_capped": out["steps_capped"], "steps_skipped": out["steps_skipped"],
            "steps_scale_below_0.1": int(low.sum()), "longest_scale_below_0.1": _stretch(low.tolist()),
            "first_scale_below_0.1": int(np.argmax(low)) if low.any() else None,
            "rho_median": float(np.nanmedian(rho)), "rho_min": float(np.nanmin(rho)),
            "tau_median": float(np.nanmedian(tau)), "scale_median": float(np.nanmedian(scale)),
            # a collapsed radius (ρ below a tenth of the run's median ρ) vs a long proposal (τ above 10× its median)
            "steps_rho_collapsed": int((rho < 0.1 * np.nanmedian(rho)).sum()),
            "steps_low_scale_with_collapsed_rho": int((low & (rho < 0.1 * np.nanmedian(rho))).sum()),
        })
        if kind == "calm" and lr in config.series_lrs:
            row["series"] = {k: [sig(float(v), 4) for v in out[k]] for k in ("tau", "rho", "scale")}
    return row


def trap_trace(method: str, config: DefaultsConfig) -> dict[str, Any]:
    """Seed ``trap_seed`` at ``trap_lr`` under ``method`` (a whole-batch SafeStep): every ``trap_every`` steps the
    applied update's direction is probed on the whole batch and both bounds' per-row radii are computed, π/Δ_a
    (ghost) and R_w (weighted); for each bound's binding row: its position, label, label probability, top
    probability, slope spread Δ_a, the probabilities of the classes with the extreme slopes, both radii of that row
    and the final LayerNorm's input scale there."""
    from safestep import SafeStep
    from safestep.bounds import Ghost, Weighted
    from safestep.norm import global_norm
    from safestep.probe import LogitProbe

    from ..lm import lm_loss
    from .lm_common import build_model, load_text, parse_bound

    setup, seed, lr = config.setup, config.trap_seed, config.trap_lr
    options = dict(methods()[method].options)
    options["bound"] = parse_bound(options["bound"])
    text = load_text(setup.tokenizer)
    model = build_model(setup, seed)
    sampler = text.sampler(setup.batch_size, setup.seq_len, seed=seed)
    inner = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=setup.weight_decay)
    guard = SafeStep(inner, model, **options)
    probe, bounds = LogitProbe(model), {"ghost": Ghost(), "weighted": Weighted()}
    ln_scale: dict[str, torch.Tensor] = {}

    def record_scale(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            ln_scale["x"] = args[0].detach().std(dim=-1)

    hook = model.ln_f.register_forward_hook(record_scale)
    series: dict[str, list[float]] = {"loss": [], "tau": [], "rho": [], "scale": []}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        for step in range(config.trap_steps):
            inputs, labels = sampler.batch(step)
            inner.zero_grad()
            loss = lm_loss(model(inputs), labels)
            loss.backward()
            analyse = step % config.trap_every == 0
            theta0 = {n: p.detach().clone() for n, p in model.named_parameters()} if analyse else None
            guard.step(inputs=inputs, labels=labels)
            report = guard.last_report
            for key, value in (("loss", loss.item()), ("tau", report.tau), ("rho", report.rho),
                               ("scale", 0.0 if report.skipped else report.scale)):
                series[key].append(sig(float(value), 5))
            if theta0 is None:
                continue
            with torch.no_grad():
                delta = {n: p.detach() - theta0[n] for n, p in model.named_parameters()}
                length = float(global_norm(list(delta.values())))
                if not length > 0:
                    continue
                s = probe(theta0, {n: d / length for n, d in delta.items()}, inputs, "jvp")
                z = s.logits.reshape(-1, s.logits.shape[-1]).double()
                a = s.slopes.reshape(-1, s.slopes.shape[-1]).double()
                y = labels.reshape(-1)
                radii = {name: b.row_radii(s.logits, s.slopes, labels).reshape(-1).double() for name, b in bounds.items()}
                prob = torch.softmax(z, dim=-1)
                spread = a.amax(-1) - a.amin(-1)
                scale_x = ln_scale["x"].reshape(-1).double()
                row: dict[str, Any] = {"step": step, "tau": report.tau, "rho": report.rho, "scale": report.scale,
                                       "ratio_weighted_over_ghost_median": sig(float((radii["weighted"] / radii["ghost"]).median()), 4)}
                for name, r in radii.items():
                    i = int(r.argmin())
                    hi, lo = int(a[i].argmax()), int(a[i].argmin())
                    row[name] = {
                        "rho": sig(float(r[i]), 5), "position": i % labels.shape[1], "label": int(y[i]),
                        "p_label": sig(float(prob[i, y[i]]), 4), "p_top": sig(float(prob[i].max()), 4),
                        "spread": sig(float(spread[i]), 4), "spread_median": sig(float(spread.median()), 4),
                        "p_slope_max_class": sig(float(prob[i, hi]), 4), "p_slope_min_class": sig(float(prob[i, lo]), 4),
                        "ghost_rho_of_row": sig(float(radii["ghost"][i]), 5),
                        "weighted_rho_of_row": sig(float(radii["weighted"][i]), 5),
                        "ln_scale_percentile": sig(float((scale_x < scale_x[i]).double().mean()), 3),
                        "radius_median": sig(float(r.median()), 4),
                    }
                rows.append(row)
    finally:
        hook.remove()
    # scale < 0.1 of a capped step is τ > 10ρ; so it reads for the monitored (never scaled) reference too
    low = [t * BARS["trap_scale"] > r for t, r in zip(series["tau"], series["rho"])]
    return {"kind": "trap", "lr_value": lr, "factor": 1.0, "method": method, "seed": seed, "series": series,
            "rows": rows, "steps_scale_below_0.1": sum(low), "longest_scale_below_0.1": _stretch(low),
            "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------------------- summary

def _group(runs: list[dict], kind: str, lr: float, method: str, factor: float = 1.0) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if r["kind"] == kind and r["lr_value"] == lr and r["method"] == method
            and r["factor"] == factor}


def _cells(runs: list[dict], config: DefaultsConfig) -> dict[str, Any]:
    """Per (kind, LR, factor, method): per-seed final losses, median, seconds, and the guard's trap counts."""
    cells: dict[str, Any] = {}
    keys = sorted({(r["kind"], r["lr_value"], r["factor"], r["method"]) for r in runs if r["kind"] != "trap"})
    for kind, lr, factor, method in keys:
        group = _group(runs, kind, lr, method, factor)
        finals = {seed: group[seed]["final_val_loss"] for seed in sorted(group)}
        cell = {"kind": kind, "lr": lr, "factor": factor, "method": method, "per_seed": finals,
                "median": float(np.median(list(finals.values()))), "seconds": {s: sig(group[s]["seconds"], 3) for s in group},
                "seconds_median": float(np.median([g["seconds"] for g in group.values()]))}
        if method.startswith("ss-"):
            for key in ("steps_scale_below_0.1", "longest_scale_below_0.1", "steps_capped", "rho_median",
                        "steps_low_scale_with_collapsed_rho"):
                cell[key] = {s: group[s].get(key) for s in group}
        cells[f"{kind}/{lr:g}/x{factor:g}/{method}"] = cell
    return cells


def _cell(cells: dict, kind: str, lr: float, method: str, factor: float = 1.0) -> dict | None:
    return cells.get(f"{kind}/{lr:g}/x{factor:g}/{method}")


def bars(cells: dict[str, Any], config: DefaultsConfig, initial: float) -> dict[str, dict[str, Any]]:
    """Every bar of issue 19 for every method with data, as {bar: {"met": bool | None, "value", "detail"}}.

    * ``per_seed``: at every calm LR and cosine peak where plain AdamW trains (its median below the untrained loss),
      no seed more than 3 % worse than plain AdamW on the same seed; value = the worst ratio − 1.
    * ``median``: the median at or below plain AdamW's at each of those cells; value = the worst median ratio − 1.
    * ``trap``: no calm run with ≥ 50 steps at scale < 0.1; value = the most such steps in one run.
    * ``spike``: every spiked run within 5 % of the same seed's run without a spike (same LR, constant); value =
      the worst ratio − 1.
    * ``flat``: worst/best median final loss over the constant-LR sweep below plain AdamW's; value = the ratio.
    * ``cost``: the median seconds per calm run over plain AdamW's (stated, not a pass/fail bar).
    Cells missing from the runs are skipped and named in ``detail``; a bar with no data has ``met`` None.
    """
    names = sorted({c["method"] for c in cells.values()}, key=lambda m: (BASELINES + CANDIDATES).index(m))
    out: dict[str, dict[str, Any]] = {}
    contexts = [("calm", lr) for lr in config.lrs] + [("cosine", lr) for lr in config.lr_pairs if config.cosine_methods]
    for method in names:
        if method == "plain":
            continue
        result: dict[str, Any] = {}
        worst_seed, worst_median, missing = (-math.inf, ""), (-math.inf, ""), []
        for kind, lr in contexts:
            mine, plain = _cell(cells, kind, lr, method), _cell(cells, kind, lr, "plain")
            if mine is None or plain is None:
                missing.append(f"{kind} {lr:g}")
                continue
            if not plain["median"] < initial:
                continue  # plain AdamW does not train here: the bar does not apply
            for seed, value in mine["per_seed"].items():
                if seed in plain["per_seed"]:
                    ratio = value / plain["per_seed"][seed] - 1
                    if ratio > worst_seed[0]:
                        worst_seed = (ratio, f"{kind} lr {lr:g} seed {seed}: {fmt(value)} vs {fmt(plain['per_seed'][seed])}")
            ratio = mine["median"] / plain["median"] - 1
            if ratio > worst_median[0]:
                worst_median = (ratio, f"{kind} lr {lr:g}: median {fmt(mine['median'])} vs {fmt(plain['median'])}")
        note = f"; not run: {', '.join(missing)}" if missing else ""
        result["per_seed"] = {"met": None if worst_seed[0] == -math.inf else worst_seed[0] <= BARS["per_seed"],
                              "value": worst_seed[0], "detail": worst_seed[1] + note}
        result["median"] = {"met": None if worst_median[0] == -math.inf else worst_median[0] <= 0.0,
                            "value": worst_median[0], "detail": worst_median[1] + note}
        if method.startswith("ss-"):
            worst = (-1, "")
            for lr in config.lrs:
                cell = _cell(cells, "calm", lr, method)
                if cell is None:
                    continue
                for seed, count in cell["steps_scale_below_0.1"].items():
                    if count > worst[0]:
                        worst = (count, (f"lr {lr:g} seed {seed}: {count} steps at scale < 0.1 (longest stretch "
                                         f"{cell['longest_scale_below_0.1'][seed]})"))
            result["trap"] = {"met": None if worst[0] < 0 else worst[0] < BARS["trap_steps"], "value": worst[0],
                              "detail": worst[1]}
            worst, ran = (-math.inf, ""), set()
            for lr in config.lr_pairs:
                base = _cell(cells, "calm", lr, method)
                for factor in config.spike_factors:
                    spiked = _cell(cells, "spike", lr, method, factor)
                    if spiked is None or base is None:
                        continue
                    ran.add(factor)
                    for seed, value in spiked["per_seed"].items():
                        if seed in base["per_seed"]:
                            ratio = value / base["per_seed"][seed] - 1
                            if ratio > worst[0]:
                                worst = (ratio, (f"×{factor:g} at lr {lr:g} seed {seed}: {fmt(value)} vs "
                                                 f"{fmt(base['per_seed'][seed])} without the spike"))
            cut = [f"×{f:g}" for f in config.spike_factors if f not in ran]
            result["spike"] = {"met": None if worst[0] == -math.inf else worst[0] <= BARS["spike"],
                               "value": worst[0], "detail": (worst[1] or "not run")
                               + (f"; not run: {', '.join(cut)}" if cut and ran else "")}
        sweep = {lr: _cell(cells, "calm", lr, method) for lr in config.lrs}
        base_sweep = {lr: _cell(cells, "calm", lr, "plain") for lr in config.lrs}
        if all(c is not None for c in sweep.values()) and all(c is not None for c in base_sweep.values()):
            mine = max(c["median"] for c in sweep.values()) / min(c["median"] for c in sweep.values())
            plain = max(c["median"] for c in base_sweep.values()) / min(c["median"] for c in base_sweep.values())
            result["flat"] = {"met": mine < plain, "value": mine,
                              "detail": f"worst/best median over the sweep {mine:.3f} vs plain AdamW's {plain:.3f}"}
        else:
            result["flat"] = {"met": None, "value": math.nan, "detail": "sweep incomplete"}
        ratios = []
        for lr in config.lrs:
            mine, plain = _cell(cells, "calm", lr, method), _cell(cells, "calm", lr, "plain")
            if mine is not None and plain is not None:
                ratios.append(mine["seconds_median"] / plain["seconds_median"])
        result["cost"] = {"met": None, "stated": bool(ratios), "value": float(np.median(ratios)) if ratios else math.nan,
                          "detail": (f"median seconds per {config.steps}-step run {np.median(ratios):.2f}× plain AdamW's "
                                     f"(per LR {', '.join(f'{x:.2f}' for x in ratios)})") if ratios else "not run"}
        out[method] = result
    return out


SAFETY_BARS = ("spike", "trap")
"""The bars a default must meet first: what the guard exists for (a spike rescued) and never freezing a run."""
HARM_BARS = ("per_seed", "median", "flat")


def choose_default(table: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """The candidate to ship and why: among the SafeStep candidates with every bar run, those meeting both safety
    bars first; then the fewest missed no-harm bars; then the smallest worst-seed loss against plain AdamW."""
    ran = {m: t for m, t in table.items() if m.startswith("ss-")
           and all(t[b]["met"] is not None for b in SAFETY_BARS + HARM_BARS)}
    if not ran:
        return "", "no candidate has every bar run"

    def rank(method: str) -> tuple[int, int, float]:
        bars_of = ran[method]
        unsafe = sum(not bars_of[b]["met"] for b in SAFETY_BARS)
        return unsafe, sum(not bars_of[b]["met"] for b in HARM_BARS), bars_of["per_seed"]["value"]

    best = min(ran, key=rank)
    unsafe, harmful, _ = rank(best)
    safe = [m for m in ran if rank(m)[0] == 0]
    why = (f"the only candidate meeting both safety bars ({', '.join(SAFETY_BARS)})" if safe == [best] else
           f"meets both safety bars and misses the fewest no-harm bars ({harmful})" if not unsafe else
           f"no candidate meets both safety bars; it misses the fewest bars ({unsafe + harmful})")
    missed = [f"{name} ({_value(name, ran[best][name])})" for name in SAFETY_BARS + HARM_BARS
              if not ran[best][name]["met"]]
    return best, why + (f"; it misses {', '.join(missed)}" if missed else "; it meets every bar")


def _trap_summary(runs: list[dict]) -> dict[str, Any]:
    """For each traced method: the binding rows under each bound, in and out of the slow stretch."""
    out: dict[str, Any] = {}
    for run in (r for r in runs if r["kind"] == "trap"):
        rows = run["rows"]
        summary: dict[str, Any] = {"steps_scale_below_0.1": run["steps_scale_below_0.1"],
                                   "longest_scale_below_0.1": run["longest_scale_below_0.1"],
                                   "analysed_steps": len(rows), "seconds": run["seconds"]}
        low = [r for r in rows if r["tau"] * BARS["trap_scale"] > r["rho"]]  # τ/ρ > 10: scale < 0.1 if capped
        for part, chosen in (("low_scale", low), ("other", [r for r in rows if r not in low])):
            if not chosen:
                continue
            entry: dict[str, Any] = {"steps": len(chosen)}
            for bound in ("ghost", "weighted"):
                entry[bound] = {key: sig(float(np.median([r[bound][key] for r in chosen])), 4) for key in ("rho", "p_label", "p_top", "spread", "spread_median",
                                                           "p_slope_max_class", "p_slope_min_class",
                                                           "ghost_rho_of_row", "weighted_rho_of_row",
                                                           "ln_scale_percentile", "radius_median")}
                entry[bound]["same_row_share"] = sig(float(np.mean([
                    r["ghost"]["position"] == r["weighted"]["position"] and r["ghost"]["label"] == r["weighted"]["label"]
                    for r in chosen])), 3)
            entry["tau_median"] = sig(float(np.median([r["tau"] for r in chosen])), 4)
            entry["rho_ratio_weighted_over_ghost_min"] = sig(float(np.median(
                [r["weighted"]["rho"] / r["ghost"]["rho"] for r in chosen])), 4)
            entry["row_ratio_median"] = sig(float(np.median([r["ratio_weighted_over_ghost_median"] for r in chosen])), 4)
            summary[part] = entry
        out[run["method"]] = summary
    return out


def summarize(runs: list[dict[str, Any]], config: DefaultsConfig) -> dict[str, Any]:
    cells = _cells(runs, config)
    initial = float(np.median([r["val_loss"][0] for r in runs if r["kind"] != "trap"]))
    return {"cells": cells, "bars": bars(cells, config, initial), "trap": _trap_summary(runs),
            "initial_val_loss": initial}


BAR_TEXT = {
    "per_seed": "no seed more than 3 % worse than plain AdamW at any LR where plain AdamW trains (constant LRs and the "
                "warm-up + cosine peaks)",
    "median": "median at or below plain AdamW's at every such LR",
    "trap": "never trapped: no calm run spends 50 steps at a scale below 0.1 (a tenth of its proposed step)",
    "spike": "every spike factor (×10/×100/×1000 held 30 steps, at the tuned LR and 3×) rescued to within 5 % of "
             "the same seed's run without a spike",
    "flat": "a flatter response to the LR than plain AdamW's (worst/best median final loss over the constant-LR sweep)",
    "cost": "cost per run, stated (median seconds of a 300-step run over plain AdamW's)",
}


def _verdict(bar: dict) -> str:
    if bar["met"] is None:
        return "stated" if bar.get("stated") else "not run"
    return "met" if bar["met"] else "missed"


def _value(name: str, bar: dict) -> str:
    value = bar["value"]
    if not isinstance(value, (int, float)) or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if name in ("per_seed", "median", "spike"):
        return f"{100 * value:+.2f} %" if abs(value) < 0.01 else f"{100 * value:+.1f} %"
    if name == "trap":
        return f"{value} steps"
    return f"{value:.3f}" if name == "flat" else f"{value:.2f}×"


def bar_table(summary: dict) -> str:
    """Markdown: one row per (method, bar), the missed bars first."""
    lines = ["| method | bar | verdict | value | where |", "|---|---|---|---|---|"]
    items = [(m, b, v) for m, table in summary["bars"].items() for b, v in table.items()]
    order = {"missed": 0, "met": 1, "stated": 2, "not run": 3}
    for method, name, bar in sorted(items, key=lambda t: (order[_verdict(t[2])], t[0], t[1])):
        lines.append(f"| {method} | {name} | **{_verdict(bar)}** | {_value(name, bar)} | {bar['detail']} |")
    return "\n".join(lines)


def seed_table(summary: dict, config: DefaultsConfig, kind: str = "calm", factor: float = 1.0) -> str:
    """Markdown: per (LR, method) the final validation loss of every seed, the median and seconds per run."""
    cells = [c for c in summary["cells"].values() if c["kind"] == kind and c["factor"] == factor]
    if not cells:
        return ""
    seeds = config.seeds
    head = "| LR | method | " + " | ".join(f"seed {s}" for s in seeds) + " | median | s/run |"
    lines = [head, "|" + "---|" * (len(seeds) + 4)]
    order = BASELINES + CANDIDATES
    for cell in sorted(cells, key=lambda c: (c["lr"], order.index(c["method"]))):
        plain = _cell(summary["cells"], kind, cell["lr"], "plain", 1.0)
        values = []
        for s in seeds:
            v = cell["per_seed"].get(s)
            text = "–" if v is None else fmt(v)
            if v is not None and plain is not None and cell["method"] != "plain" and s in plain["per_seed"] \
                    and kind != "spike" and v > (1 + BARS["per_seed"]) * plain["per_seed"][s]:
                text = f"**{text}**"
            values.append(text)
        lines.append(f"| {cell['lr']:g} | {cell['method']} | " + " | ".join(values)
                     + f" | {fmt(cell['median'])} | {cell['seconds_median']:.0f} |")
    return "\n".join(lines)


def _claims(summary: dict, config: DefaultsConfig) -> list[Claim]:
    claims = []
    for method, table in summary["bars"].items():
        if not method.startswith("ss-"):
            continue
        met = [n for n, b in table.items() if b["met"] is True]
        missed = [n for n, b in table.items() if b["met"] is False]
        text = "; ".join(f"{n}: {_verdict(b)} ({_value(n, b)}; {b['detail']})" for n, b in table.items())
        verdict = "holds" if not missed and met else ("partly" if met else "differs")
        claims.append(Claim(f"{method} meets every bar of issue 19", "no harm, real help (issue 19's bars)", text,
                            verdict, f"{len(config.seeds)} seeds, {config.steps} steps; bars as in BAR_TEXT"))
    return claims


def _figure(summary: dict, config: DefaultsConfig):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), constrained_layout=True)
    left, right = fig.subplots(1, 2)
    names = [m for m in BASELINES + CANDIDATES if any(c["method"] == m for c in summary["cells"].values())]
    for k, method in enumerate(names):
        lrs, values = [], []
        for lr in config.lrs:
            cell = _cell(summary["cells"], "calm", lr, method)
            if cell is None:
                continue
            for v in cell["per_seed"].values():
                lrs.append(lr * 10 ** (0.025 * (k - len(names) / 2)))
                values.append(v)
        left.scatter(lrs, values, s=10, label=method)
        meds = [(lr, _cell(summary["cells"], "calm", lr, method)) for lr in config.lrs]
        meds = [(lr, c["median"]) for lr, c in meds if c is not None]
        if meds:
            left.plot(*zip(*meds), lw=1)
    left.set_xscale("log")
    left.set_xlabel("constant AdamW LR")
    left.set_ylabel("final validation loss (each seed; line: median)")
    left.set_title("calm sweep", fontsize=10)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    for run_name, trace in summary.get("trap_series", {}).items():
        right.plot(trace["scale"], lw=1, label=f"scale, {run_name}")
    right.set_yscale("log")
    right.set_xlabel("step")
    right.set_ylabel("applied / proposed step length")
    right.set_title(f"seed {config.trap_seed}, lr {config.trap_lr:g}", fontsize=10)
    right.axhline(BARS["trap_scale"], color="grey", ls=":")
    right.legend(fontsize=7)
    return fig


def experiment_name(config: DefaultsConfig) -> str:
    """``lm-defaults`` for the byte GPT, ``lm-defaults-bpe`` for the BPE GPT."""
    return "lm-defaults" if config.setup.preset == "byte" else f"lm-defaults-{config.setup.preset}"


def build_result(runs: list[dict[str, Any]], config: DefaultsConfig, quick: bool, seconds: float,
                 missing: list[str] | None = None) -> ExperimentResult:
    """The summary, bars, tables and claims of whatever runs are given; ``missing`` names the units cut."""
    summary = summarize(runs, config)
    summary["trap_series"] = {r["method"]: {"scale": r["series"]["scale"]} for r in runs if r["kind"] == "trap"}
    summary["missing_units"] = missing or []
    ghost = f" (ss-ghost at {', '.join(f'{lr:g}' for lr in config.ghost_lrs)})" if config.ghost_lrs else ""
    cosine = (f"Warm-up ({config.warmup} steps) + cosine to {config.min_ratio:g}·peak at peaks {config.lr_pairs[0]:g} "
              f"and {config.lr_pairs[1]:g}, methods {', '.join(config.cosine_methods)}. ") if config.cosine_methods else ""
    trap = (f" Trap analysis: seed {config.trap_seed}, lr {config.trap_lr:g}, {config.trap_steps} steps, the update "
            f"probed on the whole batch every {config.trap_every} steps, methods {', '.join(config.trap_methods)} and "
            "plain AdamW (monitored, never scaled).") if config.trap_methods else ""
    protocol = (
        f"{config.setup.describe()}; {config.steps} steps, seeds {', '.join(map(str, config.seeds))}, validation "
        f"every {config.eval_every} steps. Calm: constant LR ∈ {{{', '.join(f'{lr:g}' for lr in config.lrs)}}}, "
        f"methods {', '.join(config.calm_methods)}{ghost}. "
        f"Spikes ×{'/×'.join(f'{f:g}' for f in config.spike_factors)} held for steps {config.spike_start}–"
        f"{config.spike_start + config.spike_steps - 1} at lr {config.lr_pairs[0]:g} (tuned) and "
        f"{config.lr_pairs[1]:g}, methods {', '.join(config.spike_methods)}. {cosine}SafeStep: cap, r = 1; "
        "ss-default = bound 'ghost', probe_size=0.125, probe_select 'mixed', method 'auto' (the library's defaults); "
        "ss-weighted = bound 'weighted' (R_w), probe_size=None (whole batch); ss-weighted-p8 = R_w, "
        "probe_size=0.125; ss-ghost = π/Δ_a, whole batch. "
        f"zclip: z = {ZCLIP['z']}, EMA {ZCLIP['alpha']}, warm-up {config.baseline_warmup} steps.{trap}"
    )
    notes = [corpus_note(config.setup),
             ("Seconds are wall-clock per run on a 2-core machine shared with other jobs (one torch thread per "
              "worker, two workers); ratios between methods are more telling than the absolute values."),
             (f"The tuned LR is {config.tuned_lr:g}: plain AdamW's best constant LR for the byte GPT at 300 steps "
              "in lm-calm (3 seeds), fixed before this protocol ran; the calm sweep here checks it"
              + ("." if config.setup.preset == "byte" else " for this model too."))]
    if missing:
        notes.append(f"Cut (not run before the deadline): {len(missing)} unit(s): " + "; ".join(missing))
    tables = {"calm": seed_table(summary, config, "calm"), "cosine": seed_table(summary, config, "cosine"),
              **{f"spike x{f:g}": seed_table(summary, config, "spike", f) for f in config.spike_factors},
              "bars": bar_table(summary)}
    summary["tables"] = tables
    name = experiment_name(config)
    return ExperimentResult(
        name=name, title=f"SafeStep's candidate defaults on the {config.setup.preset.upper()} GPT: seeds × LRs × spikes"
                         + (" × schedule" if config.cosine_methods else ""),
        paper_ref=f"issue 19 (no harm, real help), {name}", protocol=protocol,
        config={**asdict(config), "methods_options": {k: asdict(v) for k, v in methods(config.baseline_warmup).items()},
                "bars": BARS, "bar_text": BAR_TEXT},
        seeds=list(config.seeds), metrics={"summary": summary, "runs": runs}, claims=_claims(summary, config),
        figures={"lm_defaults": lambda: _figure(summary, config)}, notes=notes, seconds=seconds)


def collect(config: DefaultsConfig, cache: str | Path) -> tuple[list[dict], list[str]]:
    """The finished units in ``cache`` (``run_units``' pickles) and the labels of those not finished."""
    import pickle

    runs, missing = [], []
    for unit in units(config):
        path = _cache_file(Path(cache), run_unit, unit)
        if path.exists():
            runs.append(pickle.loads(path.read_bytes()))
        else:
            missing.append(_label(unit))
    return runs, missing


def _label(unit: Unit) -> str:
    kind, lr, factor, method, seed, _ = unit
    return f"{kind} lr {lr:g}" + (f" x{factor:g}" if kind == "spike" else "") + f" {method} seed {seed}"


def _cost(unit: Unit) -> float:
    method = unit[3]
    return {"ss-weighted": 4.0, "ss-ghost": 4.0, "ss-weighted-p8": 2.5, "ss-default": 1.8}.get(method, 1.0) \
        * (3.0 if unit[0] == "trap" else 1.0)


def run(options: RunOptions, full: DefaultsConfig = FULL, quick: DefaultsConfig = QUICK) -> ExperimentResult:
    """Every phase in order (``run_units`` per phase, resumable through ``options.cache``), then the summary."""
    started = time.perf_counter()
    config = quick if options.quick else full
    config = replace(config, seeds=options.seed_tuple(config.seeds))
    runs: list[dict] = []
    for batch in phases(config):
        runs += run_units(run_unit, batch, options.worker_count(), options.report, cache=options.cache,
                          label=_label, cost=_cost)
    return build_result(runs, config, options.quick, time.perf_counter() - started)


def readme_block(summary: dict, config: DefaultsConfig) -> str:
    """The README's generated table: per method and cell the median final loss and its worst seed (against plain
    AdamW on the same seed; for a spike, against the method's own calm run), then each candidate's bars (missed
    first) and the candidate the rule chooses."""
    cells = summary["cells"]
    columns = ([("calm", lr, f"{lr:g}", 1.0) for lr in config.lrs]
               + [("cosine", lr, f"cos {lr:g}", 1.0) for lr in config.lr_pairs if config.cosine_methods]
               + [("spike", config.tuned_lr, f"×{f:g} at {config.tuned_lr:g}", f) for f in sorted(config.spike_factors)])
    lines = ["| method | " + " | ".join(c[2] for c in columns) + " | s/run |", "|---|" + "---|" * (len(columns) + 1)]
    for method in BASELINES + CANDIDATES:
        row, seconds = [], []
        for kind, lr, _, factor in columns:
            cell = _cell(cells, kind, lr, method, factor)
            if cell is None:
                row.append("–")
                continue
            # calm and cosine: against plain AdamW on the same seed; a spike: against the method's own calm run
            base, bar = ((_cell(cells, kind, lr, "plain"), "per_seed") if kind != "spike" else
                         (_cell(cells, "calm", lr, method), "spike"))
            seconds += [cell["seconds_median"]] if kind != "spike" else []
            text = fmt(cell["median"])
            if base is not None and (method != "plain" or kind == "spike"):
                worst = max(v / base["per_seed"][s] - 1 for s, v in cell["per_seed"].items() if s in base["per_seed"])
                text += f" ({100 * worst:+.0f} %)"
                if worst > BARS[bar]:
                    text = f"**{text}**"
            row.append(text)
        if any(x != "–" for x in row):
            lines.append(f"| {method} | " + " | ".join(row) + f" | {np.median(seconds):.0f} |")
    lines.append("")
    for method, table in summary["bars"].items():
        if not method.startswith("ss-"):
            continue
        order = {"missed": 0, "met": 1, "not run": 2, "stated": 3}
        parts = [f"{name} **{_verdict(bar)}** ({_value(name, bar)})"
                 for name, bar in sorted(table.items(), key=lambda kv: order[_verdict(kv[1])])]
        lines.append(f"- `{method}`: " + ", ".join(parts))
    chosen, why = choose_default(summary["bars"])
    if chosen:
        lines += ["", f"**Chosen by the protocol** (safety bars first, then the fewest missed no-harm bars, then the "
                      f"worst seed): `{chosen}`, {why}."]
    return "\n".join(lines)


def generated_blocks(payload: dict[str, Any]) -> dict[str, str]:
    """The generated README/docs blocks of one full run's results.json, by marker name: ``<name>`` (the README's
    table and bars), ``<name>-calm``, ``<name>-cosine``, ``<name>-spike`` and ``<name>-bars`` (docs)."""
    name, summary = payload["name"], payload["metrics"]["summary"]
    config = {experiment_name(c): c for c in (FULL, BPE)}[name]  # KeyError for a protocol it does not know
    block = readme_block(summary, config)
    if summary["missing_units"]:
        block += (f"\n\nNot run before the deadline ({len(summary['missing_units'])} of {len(units(config))} units): "
                  f"see `lab/results/{name}/report.md`.")
    tables = summary["tables"]
    spikes = "\n\n".join(f"×{key.split('x')[1]}:\n\n{table}" for key, table in tables.items()
                          if key.startswith("spike") and table)
    return {name: block, f"{name}-calm": tables["calm"], f"{name}-cosine": tables["cosine"] or "(not run)",
            f"{name}-spike": spikes or "(not run)", f"{name}-bars": tables["bars"]}


def write_outputs(cache: str | Path, out_dir: str | Path, config: DefaultsConfig = FULL) -> ExperimentResult:
    """Collect the finished units from ``cache`` and write results.json, report.md and the figure to ``out_dir``
    (the units not finished are listed as cut)."""
    from ..report import write_result

    started = time.perf_counter()
    runs, missing = collect(config, cache)
    result = build_result(runs, config, quick=False, seconds=time.perf_counter() - started, missing=missing)
    result.seconds = float(sum(r["seconds"] for r in runs))
    write_result(result, out_dir)
    return result


EXPERIMENT = Experiment(
    name="lm-defaults", paper_ref="issue 19: SafeStep's defaults on language models",
    summary="candidate defaults (ghost/weighted × probe 1/8/whole batch) vs AdamW, clip, ZClip: 5 seeds × LRs, "
            "spikes, warm-up + cosine, and the trap analysed",
    full_time="≈ 2 h wall, 2 workers on a 2-core machine (373 runs of 300 steps, 4.1 h of run time)",
    quick_time="≈ 10 s", run=run)
