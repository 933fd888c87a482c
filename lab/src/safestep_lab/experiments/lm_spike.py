"""Issue 9, lm-spike: held ×10/×100/×1000 LR spikes on a byte-level GPT trained with AdamW on Python sources.

Protocol (the issue's): AdamW at lr 3e-3; for ``spike_steps`` = 30 steps from ``spike_start`` the LR is multiplied
by the factor (held), then returns to 3e-3. Methods, each from the same initialisation and the same batches per
seed: plain AdamW; ``clip_grad_norm_(1.0)``; a ZClip-style z-score clipper; skip-the-step-on-a-loss-spike; and
SafeStep (cap, r = 1) with an explicit probe. Reference runs without a spike (factor 1) give what the spike costs.
Outputs: validation-loss curves, final validation loss per (factor, method) over seeds, SafeStep's ρ and scale.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from ..parallel import run_units
from ..report import Claim, ExperimentResult
from . import Experiment, RunOptions
from .lm_common import (SAFESTEP_PROBE, LMSetup, Method, Schedule, corpus_note, curve_panels, final, fmt,
                        issue_spike_numbers, median_curve, train_lm)

__all__ = ["SpikeConfig", "FULL", "QUICK", "methods", "run_one", "summarize", "run", "EXPERIMENT"]

ZCLIP = {"z": 2.5, "alpha": 0.97}
SKIP = {"factor": 1.5, "alpha": 0.95, "patience": 50}


@dataclass(frozen=True)
class SpikeConfig:
    """Spike factors, methods, the methods also run without a spike, seeds, steps and the spike window."""

    factors: tuple[float, ...] = (10.0, 100.0, 1000.0)
    methods: tuple[str, ...] = ("plain", "clip", "zclip", "skip", "safestep")
    extra: tuple[str, ...] = ("safestep-p4",)  # run at the largest factor only (and without a spike)
    reference: tuple[str, ...] = ("plain", "safestep", "safestep-p4")
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300
    spike_start: int = 100
    spike_steps: int = 30
    base_lr: float = 3e-3
    eval_every: int = 25
    baseline_warmup: int = 25
    setup: LMSetup = field(default_factory=LMSetup)

    def schedule(self, factor: float) -> Schedule:
        return Schedule(self.base_lr, spike_factor=factor, spike_start=self.spike_start,
                        spike_steps=self.spike_steps if factor != 1.0 else 0)

    def units(self) -> list[tuple[float, str]]:
        top = max(self.factors)
        return ([(f, m) for f in self.factors for m in self.methods] + [(top, m) for m in self.extra]
                + [(1.0, m) for m in self.reference])

    def at(self, factor: float) -> tuple[str, ...]:
        """The methods run at ``factor``."""
        if factor == 1.0:
            return self.reference
        return self.methods + (self.extra if factor == max(self.factors) else ())


FULL = SpikeConfig()
QUICK = SpikeConfig(factors=(1000.0,), methods=("plain", "clip", "zclip", "skip", "safestep"), extra=(),
                    reference=("safestep",), seeds=(0,), steps=60, spike_start=20, eval_every=20,
                    baseline_warmup=10, setup=LMSetup(val_windows=64))


def methods(config: SpikeConfig) -> dict[str, Method]:
    """Every method by name (baselines' warm-ups from the config)."""
    warm = config.baseline_warmup
    return {
        "plain": Method("plain", "plain"),
        "clip": Method("clip", "clip", (("max_norm", 1.0),)),
        "zclip": Method("zclip", "zclip", tuple(sorted({**ZCLIP, "warmup": warm}.items()))),
        "skip": Method("skip", "skip", tuple(sorted({**SKIP, "warmup": warm}.items()))),
        "safestep": Method.safestep("safestep", bound="ghost", **SAFESTEP_PROBE),
        "safestep-p4": Method.safestep("safestep-p4", bound="ghost", probe_size=4, method="jvp"),
    }


def run_one(factor: float, method: str, seed: int, config: SpikeConfig) -> dict[str, Any]:
    """One (factor, method, seed) run (see ``lm_common.train_lm``)."""
    out = train_lm(config.setup, methods(config)[method], config.schedule(factor), config.steps, seed,
                   config.eval_every)
    return {"factor": factor, **out}


def _key(factor: float, method: str) -> str:
    return f"x{factor:g}/{method}"


def summarize(runs: list[dict[str, Any]], config: SpikeConfig) -> dict[str, Any]:
    """Per (factor, method): final validation loss over seeds, the median curve, and SafeStep's ρ and scale."""
    summary: dict[str, Any] = {}
    start, stop = config.spike_start, config.spike_start + config.spike_steps
    for factor, method in config.units():
        group = [r for r in runs if r["factor"] == factor and r["method"] == method]
        cell: dict[str, Any] = {"final": final(group), "val_steps": group[0]["val_steps"],
                                "val_median": median_curve([r["val_loss"] for r in group]),
                                "seconds_median": float(np.median([r["seconds"] for r in group])),
                                "theta_norm_median": median_curve([r["theta_norm"] for r in group])}
        steps = group[0]["val_steps"]
        if start in steps:
            cell["val_before_spike_median"] = float(np.median([r["val_loss"][steps.index(start)] for r in group]))
        if "rho" in group[0]:
            rho = np.asarray([r["rho"] for r in group], dtype=float)
            scale = np.asarray([r["scale"] for r in group], dtype=float)
            tau = np.asarray([r["tau"] for r in group], dtype=float)
            cell.update({
                "rho_median": median_curve(rho.tolist()), "applied_median": median_curve((tau * scale).tolist()),
                "tau_median": median_curve(tau.tolist()),
                "steps_capped": [r["steps_capped"] for r in group],
                "rho_before_spike_median": float(np.median(rho[:, :start])),
                "rho_during_spike_median": float(np.median(rho[:, start:stop])) if factor != 1.0 else math.nan,
                "scale_during_spike_median": float(np.median(scale[:, start:stop])) if factor != 1.0 else math.nan,
                "share_steps_rho_below_0.01": float(np.mean(rho < 0.01)),
            })
        if "steps_clipped" in group[0]:
            cell["steps_clipped"] = [r["steps_clipped"] for r in group]
        if method == "skip":
            cell["steps_skipped"] = [r["steps_skipped"] for r in group]
        summary[_key(factor, method)] = cell
    summary["initial_val_loss"] = float(np.median([r["val_loss"][0] for r in runs]))
    return summary


def _median(summary: dict, factor: float, method: str) -> float:
    cell = summary.get(_key(factor, method))
    return math.nan if cell is None else cell["final"]["median"]


def _spread(summary: dict, factor: float, method: str) -> str:
    cell = summary[_key(factor, method)]["final"]
    if len(cell["per_seed"]) == 1:
        return fmt(cell["median"])
    return f"{fmt(cell['median'])} ({fmt(cell['min'])}–{fmt(cell['max'])})"


def _norm_change(summary: dict, config: SpikeConfig, factor: float, method: str) -> tuple[float, float]:
    """‖θ‖ (median over seeds) at the evaluation where the spike starts and the first one after it ends."""
    cell = summary[_key(factor, method)]
    steps, norms = cell["val_steps"], cell["theta_norm_median"]
    stop = config.spike_start + config.spike_steps
    before = [n for s, n in zip(steps, norms) if s <= config.spike_start]
    after = [n for s, n in zip(steps, norms) if s >= stop]
    return (before[-1] if before else math.nan, after[0] if after else math.nan)


def _claims(summary: dict, config: SpikeConfig) -> list[Claim]:
    issue = issue_spike_numbers()
    top = max(config.factors)
    initial = summary["initial_val_loss"]
    n = len(config.seeds)
    protocol = (f"×{top:g} held for steps {config.spike_start}–{config.spike_start + config.spike_steps - 1}, "
                f"{config.steps} steps, final validation loss, median (min–max) over {n} seed(s); untrained model: "
                f"{initial:.3g}")
    claims = []
    plain = _median(summary, top, "plain")
    claims.append(Claim(f"×{top:g} held {config.spike_steps} steps wrecks plain AdamW", f"plain AdamW ends at {fmt(issue['plain'])}",
                        f"plain AdamW {_spread(summary, top, 'plain')}",
                        "holds" if plain > initial else "differs", protocol + "; holds if it ends above the untrained "
                        "model's loss"))
    clip = _median(summary, top, "clip")
    claims.append(Claim(f"clip_grad_norm_(1.0) does not rescue a ×{top:g} spike", f"clip ends at {fmt(issue['clip'])}",
                        f"clip {_spread(summary, top, 'clip')}", "holds" if clip > initial else "differs",
                        protocol + "; holds if it ends above the untrained model's loss"))
    guarded = _median(summary, top, "safestep")
    reference = _median(summary, 1.0, "safestep")
    before = summary[_key(top, "safestep")].get("val_before_spike_median", math.nan)
    if math.isfinite(reference) and guarded <= 1.05 * reference:
        verdict = "holds"
    elif guarded < min(plain, clip) and guarded < initial:
        verdict = "partly"
    else:
        verdict = "differs"
    claims.append(Claim(
        f"SafeStep (cap, r = 1) rescues the ×{top:g} spike: it ends where it would have without one",
        f"SafeStep {issue['safestep']:.2f} with the spike, {issue['safestep_no_spike']:.2f} without",
        f"SafeStep {_spread(summary, top, 'safestep')} with the spike, {fmt(reference)} without "
        f"(validation loss {fmt(before)} when the spike began)",
        verdict, protocol + "; SafeStep probe_size=16 (the whole batch, 1024 positions), JVP; holds if within 5 % of "
        "its no-spike run, partly if it beats plain and clip but not that"))
    plain_ref = _median(summary, 1.0, "plain")
    if math.isfinite(plain_ref) and math.isfinite(reference):
        claims.append(Claim(
            "without a spike SafeStep costs nothing (final loss as plain AdamW)",
            f"SafeStep {issue['safestep_no_spike']:.2f} without a spike (plain AdamW not given)",
            f"SafeStep {_spread(summary, 1.0, 'safestep')}, plain AdamW {_spread(summary, 1.0, 'plain')}",
            "holds" if reference <= 1.02 * plain_ref else "differs",
            f"no spike, {config.steps} steps; holds if SafeStep's median is within 2 % of plain AdamW's"))
    others = ", ".join(f"{name} {_spread(summary, top, name)}" for name in ("zclip", "skip") if name in config.methods)
    if others:
        claims.append(Claim(f"LM-trainer defences under the ×{top:g} spike: z-score clipping (ZClip-style) and "
                            "skipping steps on a loss spike", "asked for, no number given", others, "not in paper",
                            protocol + f"; z-score clipper z = {ZCLIP['z']}, EMA {ZCLIP['alpha']}; skipper: loss > "
                            f"{SKIP['factor']}× EMA ({SKIP['alpha']}), patience {SKIP['patience']} steps"))
    norms = {m: _norm_change(summary, config, top, m) for m in config.at(top)}
    claims.append(Claim(
        f"what the ×{top:g} spike does to the weights: ‖θ‖ before → after the spike",
        "not reported",
        "; ".join(f"{m} {a:.3g} → {b:.3g}" for m, (a, b) in norms.items()),
        "not in paper", protocol + "; ‖θ‖ over all parameters at the evaluations at the start and the end of the "
        "spike (median over seeds). A capped step may still be long: ρ is large along directions the logits barely "
        "feel (weights feeding a LayerNorm are scale-invariant), and r = 1 allows a step of length ρ there"))
    if len(config.factors) > 1:
        per = {f: _median(summary, f, "safestep") for f in config.factors}
        spread = max(per.values()) / min(per.values())
        claims.append(Claim("SafeStep's final loss does not depend on the spike factor",
                            "×10/×100/×1000 asked for, only ×1000 reported",
                            "SafeStep " + ", ".join(f"×{f:g}: {fmt(v)}" for f, v in per.items())
                            + "; plain " + ", ".join(f"×{f:g}: {fmt(_median(summary, f, 'plain'))}" for f in config.factors),
                            "not in paper", protocol + f"; max/min over factors {spread:.3f}"))
    if "safestep-p4" in config.at(top):
        claims.append(Claim("SafeStep with a 4-sequence probe (256 positions) under the spike",
                            "the issue does not say what was probed",
                            f"probe_size=4: {_spread(summary, top, 'safestep-p4')} (no spike "
                            f"{fmt(_median(summary, 1.0, 'safestep-p4'))}); probe_size=16: {fmt(guarded)}",
                            "not in paper", protocol))
    return claims


def _figures(summary: dict, config: SpikeConfig) -> dict[str, Any]:
    shade = (config.spike_start, config.spike_start + config.spike_steps)

    def curves():
        panels = []
        for factor in (*config.factors, *((1.0,) if config.reference else ())):
            names = config.at(factor)
            panels.append((f"×{factor:g}" + (" (held 30 steps)" if factor != 1.0 else ": no spike"),
                           {m: (summary[_key(factor, m)]["val_steps"], summary[_key(factor, m)]["val_median"])
                            for m in names}))
        return curve_panels(panels, "validation loss (median over seeds)",
                            f"Byte-level GPT, AdamW lr {config.base_lr:g}: held LR spikes (shaded), "
                            f"{len(config.seeds)} seed(s)", shade=shade)

    def radius():
        top = max(config.factors)
        guarded = [m for m in ("safestep", "safestep-p4") if m in config.at(top)]
        panels = []
        for factor in (top, *((1.0,) if "safestep" in config.reference else ())):
            curves_ = {}
            for m in guarded:
                cell = summary.get(_key(factor, m))
                if cell is None:
                    continue
                steps = list(range(len(cell["rho_median"])))
                curves_[f"ρ, {m}"] = (steps, cell["rho_median"])
                curves_[f"applied step, {m}"] = (steps, cell["applied_median"])
                curves_[f"proposed τ, {m}"] = (steps, cell["tau_median"])
            panels.append((f"×{factor:g}" if factor != 1.0 else "no spike", curves_))
        panels.append((f"‖θ‖ at ×{top:g} (median over seeds)",
                       {m: (summary[_key(top, m)]["val_steps"], summary[_key(top, m)]["theta_norm_median"])
                        for m in config.at(top)}))
        return curve_panels(panels, "length (parameter norm units)",
                            "SafeStep: radius ρ, AdamW's proposed step τ and the applied step (median over seeds)",
                            shade=shade)

    return {"lm_spike": curves, "lm_spike_radius": radius}


def run(options: RunOptions) -> ExperimentResult:
    """The spike grid, its summary, claims and figures."""
    started = time.perf_counter()
    config = QUICK if options.quick else FULL
    config = replace(config, seeds=options.seed_tuple(config.seeds))
    units = [(f, m, s, config) for f, m in config.units() for s in config.seeds]
    cost = {"safestep": 2.5, "safestep-p4": 1.8}
    runs = run_units(run_one, units, options.worker_count(), options.report, cache=options.cache,
                     label=lambda u: f"x{u[0]:g} {u[1]} seed {u[2]}", cost=lambda u: 10 * cost.get(u[1], 1.0))
    summary = summarize(runs, config)
    setup = config.setup
    protocol = (
        f"{setup.describe()}. LR {config.base_lr:g}, multiplied by ×{'/×'.join(f'{f:g}' for f in config.factors)} "
        f"for the {config.spike_steps} steps {config.spike_start}–{config.spike_start + config.spike_steps - 1} (held), "
        f"then back to {config.base_lr:g}; {config.steps} steps; validation every {config.eval_every} steps. "
        "Methods: plain AdamW; clip = clip_grad_norm_(1.0) before each step; zclip = our z-score clipper (EMA mean "
        f"and variance of the global gradient norm, memory {ZCLIP['alpha']}, clip to mean + {ZCLIP['z']}·std after "
        f"{config.baseline_warmup} warm-up steps); skip = our loss-spike skipper (no update when the training loss "
        f"exceeds {SKIP['factor']}× its EMA, memory {SKIP['alpha']}, after {config.baseline_warmup} warm-up steps; "
        f"after {SKIP['patience']} consecutive skips the new level is accepted); safestep = SafeStep(AdamW, model, "
        "r=1, mode='cap', bound='ghost', probe_size=16, method='jvp'): with 16 sequences per batch the probe covers "
        "the whole batch (1024 positions, each a row of 256 logits), and ρ = min over positions of π/Δ_a along "
        "AdamW's actual step" + ("; safestep-p4: the same with probe_size=4 (4 strided sequences, 256 positions)"
                                  if "safestep-p4" in config.at(max(config.factors)) else "") +
        f". Runs without a spike: {', '.join(config.reference) or 'none'}. The byte-level model is the issue's "
        "(2 layers, d = 64) and small enough for full runs of every method and seed on two CPU cores; BPE (V = 8192) "
        "costs ≈ 10× more per step."
    )
    notes = [
        "Issue numbers: byte-level GPT-2 (2 layers, d = 64), AdamW 3e-3, ×1000 held 30 steps: plain 2100, clip 606, "
        "SafeStep 2.26 (2.25 without a spike). The issue gives no step count, batch, probe or seed count, so only the "
        "direction and the order of magnitude are comparable.",
        corpus_note(setup),
        "ZClip and the loss-spike skipper are our own implementations of the idea (safestep_lab.lm_baselines), not "
        "the published code; both are tuned to common defaults, not to this spike.",
        "An LR spike is not a gradient spike: the z-score clipper only sees the gradient norm, which stays ordinary "
        "during the first spiked step; the skipper only sees the loss after the damage is done.",
    ]
    if options.quick:
        notes.append(f"Quick variant: ×{config.factors[0]:g} only, 1 seed, {config.steps} steps, spike from step "
                     f"{config.spike_start}, {setup.val_windows} validation windows (full: ×10/×100/×1000, 3 seeds, "
                     f"{FULL.steps} steps, 256 windows).")
    return ExperimentResult(
        name="lm-spike", title="Held LR spikes on a byte-level GPT: AdamW, clipping, ZClip-style, loss-skip, SafeStep",
        paper_ref="issue 9 (language models end to end), lm-spike", protocol=protocol,
        config={**asdict(config), "methods_options": {k: asdict(v) for k, v in methods(config).items()
                                                      if k in config.methods + config.extra + config.reference}},
        seeds=list(config.seeds), metrics={"summary": summary, "runs": runs}, claims=_claims(summary, config),
        figures=_figures(summary, config), notes=notes, seconds=time.perf_counter() - started)


EXPERIMENT = Experiment(
    name="lm-spike", paper_ref="issue 9: ×1000 spike on a byte-level GPT",
    summary="held ×10/×100/×1000 LR spikes on a byte-level GPT: AdamW, clip, z-score clip, loss-skip, SafeStep",
    full_time="≈ 11 min, 2 workers on a busy 2-core machine (57 runs of 300 steps)",
    quick_time="≈ 30 s (busy machine)", run=run)
