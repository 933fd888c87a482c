"""Fig. 8 / Appendix 5.4 of "Ghosts of Softmax": gradient vs random directions, and ρ_a vs the Hessian step 2/κ.

The MLP+LayerNorm (64→128→128→10) is trained with AdamW and snapshotted the first time its test accuracy reaches
0.84 / 0.95 / 0.98 (early / mid / late). At each stage, along the descent direction −∇L/‖∇L‖ and random Gaussian
unit directions v, on a fixed evaluation subset of the training split: ρ_a = π/max_x Δ_a, the loss ratio
L(θ + rρ_a v)/L(θ) and the flip fraction (share of samples whose predicted class changes) over r, and the
directional curvature κ = vᵀHv with its quadratic-model step 2/κ.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..curvature import directional_curvature
from ..data import Split, load_digits_split
from ..models import build_model
from ..parallel import run_units
from ..report import Claim, ExperimentResult
from ..sweeps import (
    Direction, descent_direction, finite_stats, first_crossing, line_sweep, logit_radius, parameters_of,
    random_direction, train_classifier,
)
from ..training import StepRecord, evaluate
from . import Experiment, RunOptions

__all__ = ["DirectionsConfig", "FULL", "QUICK", "train_stages", "measure_direction", "run", "EXPERIMENT"]

STAGES = {"early": 0.84, "mid": 0.95, "late": 0.98}
PAPER_RATIO = {"early": 10.0, "late": 460.0}
PAPER_AT_ONE = {"loss_random": {"early": 1.08, "mid": 1.14, "late": 1.20},
                "flip_random": {"early": 0.72, "mid": 0.17, "late": 0.06}}


@dataclass(frozen=True)
class DirectionsConfig:
    """Seeds, training recipe (AdamW, checked every ``check_every`` steps), random directions and the r grid."""

    seeds: tuple[int, ...]
    random_directions: int
    max_steps: int = 750
    lr: float = 2.5e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    check_every: int = 10
    eval_samples: int = 384
    r_points: int = 42

    def r_grid(self) -> np.ndarray:
        """logspace(−3, log10 35, r_points) with r = 1 added."""
        return np.union1d(np.logspace(-3, np.log10(35.0), self.r_points), [1.0])


FULL = DirectionsConfig(seeds=(7, 11, 19, 23, 24), random_directions=20)
QUICK = DirectionsConfig(seeds=(7,), random_directions=4, max_steps=400, r_points=20)


def _seeds(count: int) -> list[int]:
    """The reference's seeds 7, 11, 19, 23, continued with 24, 25, … (the full run uses five)."""
    return [7, 11, 19, 23, *range(24, 24 + max(0, count - 4))][:count]


def train_stages(seed: int, config: DirectionsConfig, data: Split) -> dict[str, tuple[nn.Module, float]]:
    """Train the MLP+LN; per stage the first snapshot whose test accuracy ≥ the target (else the final model)."""
    torch.manual_seed(seed)
    model = build_model("mlp-ln")
    stages: dict[str, tuple[nn.Module, float]] = {}

    def snapshot(record: StepRecord) -> None:
        if (record.step + 1) % config.check_every or len(stages) == len(STAGES):
            return
        accuracy = evaluate(model, data.x_test, data.y_test)[0]
        for name, target in STAGES.items():
            if name not in stages and accuracy >= target:
                stages[name] = (copy.deepcopy(model), accuracy)

    train_classifier(model, data, config.max_steps, config.lr, seed=seed, batch_size=config.batch_size,
                     optimizer="adamw", weight_decay=config.weight_decay, progress=snapshot)
    final_accuracy = evaluate(model, data.x_test, data.y_test)[0]
    return {name: stages.get(name, (model, final_accuracy)) for name in STAGES}


def _curvature(model: nn.Module, direction: Direction, x: Tensor, y: Tensor) -> float:
    model.eval()
    loss_fn = lambda params: F.cross_entropy(functional_call(model, params, (x,)), y)
    return float(directional_curvature(loss_fn, parameters_of(model), direction))


def measure_direction(model: nn.Module, direction: Direction, x: Tensor, y: Tensor, r: np.ndarray) -> dict:
    """ρ_a, κ = vᵀHv, (2/κ)/ρ_a (κ > 0 only), loss ratio and flip fraction over r, and their onsets."""
    rho = logit_radius(model, direction, x)
    kappa = _curvature(model, direction, x, y)
    sweep = line_sweep(model, direction, r * rho, x, y)
    at_one = int(np.flatnonzero(r == 1.0)[0])
    return {"rho_a": rho, "kappa": kappa, "hessian_ratio": 2.0 / kappa / rho if kappa > 0 else None,
            "loss_ratio": sweep.loss_ratio.tolist(), "flip_fraction": sweep.flip_fraction.tolist(),
            "loss_ratio_at_1": float(sweep.loss_ratio[at_one]), "flip_at_1": float(sweep.flip_fraction[at_one]),
            "onset_1.1": first_crossing(r, sweep.loss_ratio, 1.1), "onset_2": first_crossing(r, sweep.loss_ratio, 2.0)}


def _stage_summary(runs: list[dict]) -> dict:
    gradient = [run["gradient"] for run in runs]
    random = [d for run in runs for d in run["random"]]
    positive = [d for d in random if d["kappa"] > 0]
    return {
        "test_accuracy": finite_stats([run["test_accuracy"] for run in runs]),
        "hessian_ratio_random": finite_stats([d["hessian_ratio"] for d in positive]),
        "hessian_ratio_random_per_seed": [finite_stats([d["hessian_ratio"] for d in run["random"] if d["kappa"] > 0])
                                          ["median"] for run in runs],
        "hessian_ratio_gradient": finite_stats([g["hessian_ratio"] for g in gradient if g["kappa"] > 0]),
        "random_with_kappa_le_0": len(random) - len(positive), "random_directions": len(random),
        "rho_below_hessian_step": sum(d["rho_a"] < 2.0 / d["kappa"] for d in positive),
        "gradient_kappa_le_0": sum(g["kappa"] <= 0 for g in gradient),
        **{f"{key}_{kind}": finite_stats([d[key] for d in (gradient if kind == "gradient" else random)])
           for key in ("loss_ratio_at_1", "flip_at_1", "onset_1.1", "onset_2") for kind in ("gradient", "random")},
    }


def _claims(summary: dict[str, dict]) -> list[Claim]:
    positive = sum(s["random_directions"] - s["random_with_kappa_le_0"] for s in summary.values())
    below = sum(s["rho_below_hessian_step"] for s in summary.values())
    non_convex = sum(s["random_with_kappa_le_0"] for s in summary.values())
    per_seed = {stage: s["hessian_ratio_random_per_seed"] for stage, s in summary.items()}
    ratios = {stage: float(np.median(v)) for stage, v in per_seed.items()}
    within = all(PAPER_RATIO[k] / 3 <= ratios[k] <= PAPER_RATIO[k] * 3 for k in PAPER_RATIO)
    growth = ratios["late"] / ratios["early"]
    seed_range = "; ".join(f"{stage} {min(v):.3g}–{max(v):.3g}" for stage, v in per_seed.items())
    at_one = {key: {stage: s[f"{'loss_ratio_at_1' if key == 'loss_random' else 'flip_at_1'}_random"]["median"]
                    for stage, s in summary.items()} for key in PAPER_AT_ONE}

    def close(key: str, tolerance: float) -> str:
        return "holds" if all(abs(at_one[key][k] - PAPER_AT_ONE[key][k]) <= tolerance for k in STAGES) else "differs"

    def listing(values: dict[str, float], fmt: str) -> str:
        return " / ".join(format(values[k], fmt) for k in STAGES)

    return [
        Claim("ρ_a < 2/κ for every direction (20 random dirs × 3 stages)", "in every case",
              f"{below}/{positive} random directions with κ > 0; {non_convex} with κ ≤ 0 (no Hessian limit, "
              "excluded)", "holds" if below == positive else "differs", "κ = vᵀHv on the evaluation subset"),
        Claim("Hessian step overestimates the safe step: median (2/κ)/ρ_a early / mid / late",
              "≈ 10× early → ≈ 460× late (reference code, docs/reproduction.md: 10× / 46× / 502×)",
              f"{listing(ratios, '.3g')}× (growth ×{growth:.3g}) over {len(per_seed['late'])} seeds; per-seed "
              f"range: {seed_range}",
              "holds" if within else ("partly" if growth >= 10 else "differs"),
              "per seed, the median over its random directions with κ > 0; reported: the median of those per-seed "
              "medians and their range; 'holds' if early and late are within 3× of the paper's, 'partly' if the "
              "ratio still grows ≥ 10× from early to late"),
        Claim("Loss ratio at r = 1, median random direction (early / mid / late)",
              listing(PAPER_AT_ONE["loss_random"], ".2f") + " (Fig. 8)", listing(at_one["loss_random"], ".2f"),
              close("loss_random", 0.1), "the paper's Fig. 8 model is the linear 64→10 (docs/reproduction.md); ours is "
              "the MLP+LN; 'holds' if every stage is within 0.1"),
        Claim("Flip fraction at r = 1, median random direction (early / mid / late)",
              listing(PAPER_AT_ONE["flip_random"], ".0%") + " (Fig. 8)", listing(at_one["flip_random"], ".0%"),
              close("flip_random", 0.1), "same model caveat; 'holds' if every stage is within 10 points"),
    ]


def _sweep_figure(per_stage: dict[str, list[dict]], r: np.ndarray):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 6.5), layout="constrained")
    axes = figure.subplots(2, len(STAGES), sharex=True)
    for column, (stage, runs) in enumerate(per_stage.items()):
        rows = ((0, "loss_ratio", "loss ratio L(θ+rρ_a v)/L(θ)"), (1, "flip_fraction", "flip fraction"))
        for row, key, label in rows:
            ax = axes[row, column]
            random = np.array([d[key] for run in runs for d in run["random"]])
            low, median, high = np.nanpercentile(np.where(np.isfinite(random), random, np.nan), [10, 50, 90], axis=0)
            ax.fill_between(r, low, high, color="tab:blue", alpha=0.25, label="random, 10–90%")
            ax.plot(r, median, color="tab:blue", label="random, median")
            ax.plot(r, np.median([run["gradient"][key] for run in runs], axis=0), color="tab:red",
                    label="descent −∇L (median over seeds)")
            ax.axvline(1.0, color="black", lw=1, ls="--")
            ax.set(xscale="log", ylabel=label)
            if row == 0:
                ax.set(yscale="log", title=f"{stage} (test acc ≥ {STAGES[stage]:.2f})")
            else:
                ax.set(xlabel="r = τ/ρ_a", ylim=(-0.02, 1.02))
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left")
    figure.suptitle("MLP+LayerNorm on digits: one step along descent vs random unit directions")
    return figure


def _hessian_figure(per_stage: dict[str, list[dict]]):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 5), layout="constrained")
    ax = figure.subplots()
    for stage, runs in per_stage.items():
        points = [(d["rho_a"], 2.0 / d["kappa"]) for run in runs for d in run["random"] if d["kappa"] > 0]
        ax.scatter(*zip(*points), s=12, alpha=0.7, label=stage)
    values = [v for run in per_stage.values() for r in run for d in r["random"] if d["kappa"] > 0
              for v in (d["rho_a"], 2.0 / d["kappa"])]
    span = np.geomspace(min(values), max(values), 10)
    ax.plot(span, span, color="black", lw=1, ls="--", label="2/κ = ρ_a")
    ax.set(xscale="log", yscale="log", xlabel="ρ_a = π/max Δ_a", ylabel="Hessian step 2/κ, κ = vᵀHv",
           title="Random directions (κ > 0): Hessian step vs ρ_a")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return figure


def _evaluation_set(config: DirectionsConfig) -> tuple[Split, Tensor, Tensor]:
    """The 70/30 split and its fixed evaluation subset of ``eval_samples`` training rows (default_rng(1234))."""
    data = load_digits_split(test_fraction=0.3, seed=42)
    rows = torch.as_tensor(np.sort(np.random.default_rng(1234).choice(len(data.y_train), config.eval_samples,
                                                                       replace=False)))
    return data, data.x_train[rows], data.y_train[rows]


def measure_seed(seed: int, config: DirectionsConfig) -> dict[str, dict]:
    """One seed: train to the three stages and measure the descent and random directions at each."""
    data, x, y = _evaluation_set(config)
    r = config.r_grid()
    measured = {}
    for index, (stage, (model, accuracy)) in enumerate(train_stages(seed, config, data).items()):
        generator = torch.Generator().manual_seed(10_000 * seed + index)
        measured[stage] = {
            "seed": seed, "test_accuracy": accuracy,
            "gradient": measure_direction(model, descent_direction(model, x, y), x, y, r),
            "random": [measure_direction(model, random_direction(model, generator), x, y, r)
                       for _ in range(config.random_directions)],
        }
    return measured


def run(options: RunOptions) -> ExperimentResult:
    """Per seed and stage: sweep the descent direction and random directions; compare ρ_a with 2/κ."""
    started = time.perf_counter()
    config = QUICK if options.quick else FULL
    seeds = list(config.seeds) if options.seeds is None else _seeds(options.seeds)
    r = config.r_grid()
    by_seed = run_units(measure_seed, [(seed, config) for seed in seeds], options.worker_count(), options.report, cache=options.cache,
                        label=lambda u: f"seed {u[0]}")
    per_stage = {stage: [measured[stage] for measured in by_seed] for stage in STAGES}
    summary = {stage: _stage_summary(runs) for stage, runs in per_stage.items()}
    protocol = (f"digits, stratified 70/30 split (seed 42); MLP 64→128→LN→GELU→128→LN→GELU→10 trained with AdamW "
                f"(lr {config.lr}, wd {config.weight_decay}, batch {config.batch_size}, ≤ {config.max_steps} steps), "
                f"snapshotted when test accuracy first reaches 0.84 / 0.95 / 0.98 (checked every {config.check_every} "
                f"steps); evaluation subset = {config.eval_samples} training samples (default_rng(1234)); per stage "
                f"the descent direction −∇L/‖∇L‖ and {config.random_directions} Gaussian unit directions; ρ_a by "
                "exact JVP, κ = vᵀHv by a Hessian-vector product, loss ratio and flip fraction on the subset at "
                f"r on logspace(−3, log10 35, {config.r_points}) ∪ {{1}}.")
    notes = [
        "Direction: descent −∇L/‖∇L‖ (the paper's method); the reference code sweeps +∇L (uphill, docs/reproduction.md), "
        "so our gradient curves are not comparable with the paper's gradient annotations; random directions are "
        "sign-symmetric and comparable.",
        "Fig. 8 in the paper is drawn from the linear model (randomdirs); this experiment follows the reference's "
        "phasetransition protocol on the MLP+LN (exp10), which is where docs/reproduction.md measured 10× / 46× / 502×.",
        "Random directions use a torch generator seeded by (seed, stage), reproducible across processes (the "
        "reference seeds them with Python's string hash). Minibatches are per-epoch permutations (the reference "
        "draws each batch i.i.d.).",
        "Directions with κ ≤ 0 have no quadratic-model step limit; they are counted separately, not turned into "
        "huge ratios (the reference used 2/max(κ, 1e-12)).",
        "Per-seed medians of (2/κ)/ρ_a are listed beside the pooled median: the late-stage ratio depends on how "
        "confident the network is when it first reaches 98% test accuracy, which varies between seeds.",
    ]
    if options.quick:
        notes.append(f"Quick variant: seeds {seeds}, {config.random_directions} random directions, "
                     f"≤ {config.max_steps} training steps, {config.r_points} r points.")
    return ExperimentResult(
        name="directions", title="Gradient vs random directions and the Hessian step (Fig. 8, Appendix 5.4)",
        paper_ref="Ghosts of Softmax, Fig. 8 (§6.3) and Appendix 5.4", protocol=protocol,
        config={**asdict(config), "quick": options.quick, "direction": "descent"}, seeds=seeds,
        metrics={"r": r.tolist(), "summary": summary, "stages": per_stage}, claims=_claims(summary),
        figures={"directions_sweep": lambda: _sweep_figure(per_stage, r),
                 "directions_hessian": lambda: _hessian_figure(per_stage)},
        notes=notes, seconds=time.perf_counter() - started)


EXPERIMENT = Experiment(
    name="directions", paper_ref="Ghosts of Softmax, Fig. 8 / App. 5.4",
    summary="descent vs random directions on an MLP+LN at three stages; ρ_a vs the Hessian step 2/κ",
    full_time="≈ 3 min quiet on 2 workers (5 seeds × 3 stages × 21 directions); 2–4× longer loaded",
    quick_time="about 20 s", run=run)
