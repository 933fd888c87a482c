"""Fig. 11 / Table 2 (tfmbottlenecks): which radius limits a tiny transformer's step — FFN, attention or output?

A 2-block transformer on digit row tokens is trained full-batch with AdamW. Set-mode controllers take steps of
length exactly ρ along AdamW's actual update (τ = ρ, r = 1), with ρ = ρ_out, ρ_attn, ρ_ffn or their minimum
(``safestep_lab.internal_radii``); fixed learning rates 1× and 16× are the baselines. In the minimum ("all
radii") mode we count which radius is the smallest at every logged step, per third of training (Table 2).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from safestep.update import apply, displacement, snapshot
from ..data import Split, load_digits_split
from ..internal_radii import RADIUS_NAMES, Radii, TinyTransformer, bottleneck_radii, internal_slopes
from ..parallel import run_units
from ..report import Claim, ExperimentResult
from ..training import evaluate
from . import Experiment, RunOptions

__all__ = ["MODES", "BottleneckConfig", "FULL", "QUICK", "RunLog", "train_mode", "phase_table", "run_config", "run",
           "EXPERIMENT"]

MODES = ("min", "out", "attn", "ffn", "fixed-1x", "fixed-16x")
PAPER_MODES = ("min", "out", "fixed-1x", "fixed-16x")  # the reference's canonical modes (all-radii = "min")
PHASES = ("early", "middle", "late")
_FIXED_FACTORS = {"fixed-1x": 1.0, "fixed-16x": 16.0}
_CONTROLLED = {"min", *RADIUS_NAMES}
FULL_TIME = ("≈ 40 min quiet on 2 workers (5 seeds × 4 modes × 1201 full-batch steps; a controlled step ≈ 0.3 s, "
             "a fixed one ≈ 0.1 s, one thread); 2–3× longer on a loaded machine")

# Table 2 of the paper (docs/reproduction.md): binding counts per phase and median radii in the all-radii mode.
PAPER_COUNTS = {"early": {"ffn": (94, 100), "out": (6, 100), "attn": (0, 100)},
                "middle": {"ffn": (48, 100), "out": (52, 100), "attn": (0, 100)},
                "late": {"ffn": (8, 105), "out": (97, 105), "attn": (0, 105)}}
PAPER_MEDIANS = {"early": {"ffn": 0.0164, "out": 0.0307, "attn": 0.645},
                 "middle": {"ffn": 0.0111, "out": 0.0107, "attn": 0.203},
                 "late": {"ffn": 0.0131, "out": 0.00793, "attn": 0.168}}


@dataclass(frozen=True)
class BottleneckConfig:
    """The protocol: steps (the loop takes steps + 1 updates), logging period, training subset, seeds, modes."""

    steps: int = 1200
    eval_every: int = 20
    train_size: int | None = None
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    modes: tuple[str, ...] = PAPER_MODES
    base_lr: float = 2e-3
    weight_decay: float = 1e-4
    ffn_quantile: float = 0.01

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown:
            raise ValueError(f"unknown modes {unknown}; choose from {MODES}")
        if self.steps < 1 or self.eval_every < 1 or not self.seeds:
            raise ValueError(f"need steps >= 1, eval_every >= 1 and a seed; got {self.steps}, {self.eval_every}, "
                             f"{self.seeds}")


FULL = BottleneckConfig()
QUICK = BottleneckConfig(steps=60, eval_every=5, train_size=160, seeds=(0,), modes=("min", "fixed-1x", "fixed-16x"))


@dataclass
class RunLog:
    """One (mode, seed) run: logged points (before the step at ``step``) and the final test metrics."""

    mode: str
    seed: int
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    radii: list[dict[str, float]] = field(default_factory=list)
    binding: list[str] = field(default_factory=list)
    step_length: list[float] = field(default_factory=list)
    final_accuracy: float = math.nan
    final_train_loss: float = math.nan
    diverged_at: int | None = None


def _digits(train_size: int | None) -> Split:
    """The reference split: a default_rng(42) permutation, first 539 test / 1258 train; optional train prefix."""
    split = load_digits_split(test_fraction=0.3, seed=42, stratified=False)
    if train_size is None:
        return split
    if not 0 < train_size <= len(split.y_train):
        raise ValueError(f"train_size must lie in [1, {len(split.y_train)}], got {train_size}")
    rows = torch.randperm(len(split.y_train), generator=torch.Generator().manual_seed(42))[:train_size]
    return replace(split, x_train=split.x_train[rows], y_train=split.y_train[rows])


def _step(model: TinyTransformer, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, mode: str,
          measure: bool, ffn_quantile: float) -> tuple[float, Radii | None, float]:
    """One full-batch AdamW step, rescaled to length ρ_mode in set modes; returns (loss, radii, ‖applied step‖).

    The step is the core's (safestep.update): snapshot θ0, the inner step, Δθ and τ, and the guarded write
    θ = θ0 + (ρ/τ)·Δθ with ‖θ − θ0‖ ≤ ρ exactly (``apply``).
    """
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    live = [p.detach() for p in model.parameters()]
    theta0 = snapshot(live)
    optimizer.step()
    step = displacement(live, theta0)
    tau = float(step.tau)
    if not (measure or mode in _CONTROLLED) or not math.isfinite(tau) or tau == 0.0:
        return loss.item(), None, tau
    direction = {name: d / tau for name, d in zip(names, step.delta)}
    radii = bottleneck_radii(internal_slopes(model, dict(zip(names, theta0)), direction, x), ffn_quantile)
    if mode not in _CONTROLLED:
        return loss.item(), radii, tau
    rho = radii.smallest if mode == "min" else getattr(radii, mode)
    with torch.no_grad():
        apply(live, step, rho / tau, rho, tau, float(step.theta_norm))
    return loss.item(), radii, rho


def train_mode(mode: str, seed: int, data: Split, config: BottleneckConfig) -> RunLog:
    """Train TinyTransformer (torch.manual_seed(seed)) for steps + 1 full-batch updates in one mode."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    torch.manual_seed(seed)
    model = TinyTransformer()
    lr = config.base_lr * _FIXED_FACTORS.get(mode, 1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    log = RunLog(mode, seed)
    model.train()
    for step in range(config.steps + 1):
        logged = step % config.eval_every == 0
        accuracy = evaluate(model, data.x_test, data.y_test)[0] if logged else math.nan
        model.train()
        loss, radii, length = _step(model, optimizer, data.x_train, data.y_train, mode, logged, config.ffn_quantile)
        finite = math.isfinite(loss) and math.isfinite(length) and (radii is None or math.isfinite(radii.smallest))
        if logged:
            log.steps.append(step)
            log.train_loss.append(loss)
            log.test_accuracy.append(accuracy)
            log.radii.append(radii.as_dict() if radii else {name: math.nan for name in RADIUS_NAMES})
            log.binding.append(radii.binding if radii else "none")
            log.step_length.append(length)
        if not finite:
            log.diverged_at = step
            break
    log.final_accuracy = evaluate(model, data.x_test, data.y_test)[0]
    with torch.no_grad():
        log.final_train_loss = float(F.cross_entropy(model(data.x_train), data.y_train))
    return log


def run_unit(mode: str, seed: int, config: BottleneckConfig) -> RunLog:
    """``train_mode`` on the protocol's split (a worker-process unit)."""
    return train_mode(mode, seed, _digits(config.train_size), config)


def _phase_slices(n_points: int) -> list[slice]:
    """Thirds of the logged points, the remainder going to the last (61 → 20/20/21, the paper's split)."""
    third = n_points // 3
    return [slice(0, third), slice(third, 2 * third), slice(2 * third, n_points)]


def phase_table(logs: list[RunLog]) -> dict[str, dict[str, Any]]:
    """Per phase: how often each radius is the smallest (count, total) and each radius's median over the phase."""
    table: dict[str, dict[str, Any]] = {}
    for index, phase in enumerate(PHASES):
        binding: list[str] = []
        values: dict[str, list[float]] = {name: [] for name in RADIUS_NAMES}
        for log in logs:
            part = _phase_slices(len(log.steps))[index]
            binding += [b for b in log.binding[part] if b != "none"]
            for point in log.radii[part]:
                for name in RADIUS_NAMES:
                    if math.isfinite(point[name]):
                        values[name].append(point[name])
        table[phase] = {
            "counts": {name: binding.count(name) for name in RADIUS_NAMES},
            "total": len(binding),
            "median": {name: statistics.median(v) if v else math.nan for name, v in values.items()},
        }
    return table


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _mode_summary(logs: list[RunLog]) -> dict[str, dict[str, Any]]:
    summary = {}
    for mode in dict.fromkeys(log.mode for log in logs):
        runs = [log for log in logs if log.mode == mode]
        summary[mode] = {
            "final_accuracy": [log.final_accuracy for log in runs],
            "median_final_accuracy": _median([log.final_accuracy for log in runs]),
            "median_final_train_loss": _median([log.final_train_loss for log in runs]),
            "diverged": sum(log.diverged_at is not None or not math.isfinite(log.final_train_loss) for log in runs),
        }
    return summary


def _seed_trajectories(logs: list[RunLog]) -> dict[str, int]:
    """Seeds whose all-radii run starts FFN-limited (first phase mostly ffn) and ends output-limited."""
    counts = {"starts_ffn": 0, "ends_out": 0, "seeds": 0}
    for log in logs:
        early, _, late = (log.binding[s] for s in _phase_slices(len(log.binding)))
        counts["seeds"] += 1
        counts["starts_ffn"] += int(bool(early) and early.count("ffn") > len(early) / 2)
        counts["ends_out"] += int(bool(late) and late.count("out") > len(late) / 2)
    return counts


def _count_text(counts: dict[str, int], total: int) -> str:
    return ", ".join(f"{name.upper()} {counts[name]}/{total}" for name in ("ffn", "out", "attn"))


def _seed_range(values: list[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{format(min(finite), fmt)}–{format(max(finite), fmt)}" if finite else "n/a"


def _claims(table: dict[str, dict[str, Any]], modes: dict[str, dict[str, Any]],
            trajectories: dict[str, int], per_seed: list[dict[str, dict[str, Any]]]) -> list[Claim]:
    claims = []
    seeds = len(per_seed)
    for phase in PHASES:
        row = table[phase]
        total = row["total"]
        paper = PAPER_COUNTS[phase]
        paper_text = ", ".join(f"{n.upper()} {c}/{t}" for n, (c, t) in paper.items())
        expected = max(paper, key=lambda n: paper[n][0])
        ours_top = max(RADIUS_NAMES, key=lambda n: row["counts"][n]) if total else "none"
        clear = total and row["counts"][ours_top] > total / 2 and paper[expected][0] > paper[expected][1] * 0.75
        verdict = ("holds" if ours_top == expected else "differs") if clear else (
            "partly" if total and row["counts"][expected] > 0 else "differs")
        shares = {name: [seed[phase]["counts"][name] / seed[phase]["total"] if seed[phase]["total"] else math.nan
                         for seed in per_seed] for name in RADIUS_NAMES}
        spread = ", ".join(f"{name.upper()} {_seed_range(shares[name], '.0%')}" for name in ("ffn", "out"))
        claims.append(Claim(f"{phase} third: which radius binds (all-radii mode)", paper_text,
                            f"{_count_text(row['counts'], total)} pooled over {seeds} seed(s); per-seed share "
                            f"range: {spread}", verdict,
                            "logged points of the all-radii run (every eval_every steps), pooled over seeds"))
        medians = row["median"]
        paper_medians = PAPER_MEDIANS[phase]
        same_order = sorted(RADIUS_NAMES, key=lambda n: medians[n]) == sorted(RADIUS_NAMES, key=paper_medians.get)
        ranges = " / ".join(_seed_range([seed[phase]["median"][n] for seed in per_seed], ".3g")
                            for n in ("ffn", "out", "attn"))
        claims.append(Claim(f"{phase} third: median ρ_ffn / ρ_out / ρ_attn",
                            " / ".join(f"{paper_medians[n]:.3g}" for n in ("ffn", "out", "attn")),
                            " / ".join(f"{medians[n]:.3g}" for n in ("ffn", "out", "attn"))
                            + f" (per-seed medians {ranges})",
                            "holds" if same_order else "partly" if medians["attn"] == max(medians.values()) else
                            "differs"))
    attn_total = sum(table[p]["counts"]["attn"] for p in PHASES)
    points = sum(table[p]["total"] for p in PHASES)
    claims.append(Claim("ρ_attn never binds", "0/305", f"{attn_total}/{points}",
                        "holds" if attn_total == 0 else "differs"))
    seeds = trajectories["seeds"]
    claims.append(Claim("every seed starts FFN-limited and ends output-limited", "5/5 seeds (text)",
                        f"starts FFN {trajectories['starts_ffn']}/{seeds}, "
                        f"ends output {trajectories['ends_out']}/{seeds}",
                        "holds" if trajectories["starts_ffn"] == seeds == trajectories["ends_out"] else
                        "partly" if trajectories["starts_ffn"] or trajectories["ends_out"] else "differs"))
    accuracy = {m: s["median_final_accuracy"] for m, s in modes.items()}
    if "min" in accuracy:
        best = max(accuracy, key=lambda m: accuracy[m] if math.isfinite(accuracy[m]) else -1.0)
        claims.append(Claim("all-radii gives the highest test accuracy", "not in paper (stated, no number)",
                            ", ".join(f"{m} {a:.3f} ({_seed_range(modes[m]['final_accuracy'], '.3f')})"
                                      for m, a in accuracy.items()),
                            "holds" if accuracy["min"] >= accuracy[best] - 0.005 else "differs"))
    if "fixed-16x" in modes and "min" in modes:
        loss16, loss_min = modes["fixed-16x"]["median_final_train_loss"], modes["min"]["median_final_train_loss"]
        claims.append(Claim("16× fixed LR diverges", "not in paper (stated, no number)",
                            f"final train loss 16× {loss16:.3g} vs all-radii {loss_min:.3g}; "
                            f"non-finite in {modes['fixed-16x']['diverged']} runs",
                            "holds" if not math.isfinite(loss16) or loss16 > 1.0 else "differs"))
    if "fixed-1x" in modes and "min" in modes:
        loss1, loss_min = modes["fixed-1x"]["median_final_train_loss"], modes["min"]["median_final_train_loss"]
        claims.append(Claim("1× fixed LR is slow (higher final train loss than all-radii)",
                            "not in paper (stated, no number)", f"1× {loss1:.3g} vs all-radii {loss_min:.3g}",
                            "holds" if loss1 > loss_min else "differs"))
    return claims


def _radii_figure(logs: list[RunLog]) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.2))
    axis = figure.add_subplot()
    colors = {"ffn": "tab:orange", "out": "tab:blue", "attn": "tab:green"}
    for name in RADIUS_NAMES:
        for index, log in enumerate(logs):
            axis.plot(log.steps, [point[name] for point in log.radii], color=colors[name], alpha=0.8, lw=1.2,
                      label=f"ρ_{name}" if index == 0 else None)
    n_points = min(len(log.steps) for log in logs)
    for part in _phase_slices(n_points)[1:]:
        axis.axvline(logs[0].steps[part.start], color="grey", ls=":", lw=1)
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("radius (parameter distance)")
    axis.set_title(f"All-radii controller: ρ_out, ρ_attn, ρ_ffn per step ({len(logs)} seed(s); dotted: thirds)")
    axis.legend()
    axis.grid(alpha=0.3, which="both")
    return figure


def _training_figure(logs: list[RunLog]) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    loss_axis, accuracy_axis = figure.subplots(1, 2)
    modes = list(dict.fromkeys(log.mode for log in logs))
    colors = dict(zip(modes, ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:grey", "black")))
    for mode in modes:
        for index, log in enumerate(l for l in logs if l.mode == mode):
            label = mode if index == 0 else None
            loss_axis.plot(log.steps, log.train_loss, color=colors[mode], alpha=0.8, label=label)
            accuracy_axis.plot(log.steps, log.test_accuracy, color=colors[mode], alpha=0.8, label=label)
    loss_axis.set_yscale("log")
    loss_axis.set(xlabel="step", ylabel="full-batch train loss", title="Train loss per mode")
    accuracy_axis.set(xlabel="step", ylabel="test accuracy", title="Test accuracy per mode", ylim=(0, 1.02))
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    return figure


def run_config(config: BottleneckConfig, options: RunOptions) -> ExperimentResult:
    """Run every (mode, seed) of ``config`` and build the Table 2 / Fig. 11 result."""
    started = time.perf_counter()
    data = _digits(config.train_size)
    units = [(mode, seed, config) for mode in config.modes for seed in config.seeds]
    logs = run_units(run_unit, units, options.worker_count(), options.report, cache=options.cache, label=lambda u: f"{u[0]} seed {u[1]}",
                     cost=lambda u: 2.0 if u[0] in _CONTROLLED else 1.0)
    minimum = [log for log in logs if log.mode == "min"]
    table = phase_table(minimum)
    per_seed = [phase_table([log]) for log in minimum]
    modes = _mode_summary(logs)
    trajectories = _seed_trajectories(minimum)
    protocol = (f"TinyTransformer (2 pre-LN blocks, d 32, 4 heads), full batch of {len(data.y_train)} train rows, "
                f"AdamW wd {config.weight_decay}, {config.steps + 1} updates, logged every {config.eval_every}, "
                f"seeds {list(config.seeds)}")
    notes = [
        "The step direction is AdamW's actual update (including decoupled weight decay), and the step length is set "
        "to exactly ρ (τ = ρ, r = 1); the reference sets lr_eff = ρ/‖u‖ along the Adam unit step u without the decay "
        "term. The two agree up to the small weight-decay component.",
        "ρ_ffn is the paper's proxy: the 1% quantile of |h|/|ḣ| over FFN pre-activations (GELU is entire, so this is "
        "not a convergence radius). ρ_out and ρ_attn are the certified lower bounds π/Δ (max over rows).",
        "Controllers are driven in this module, not through SafeStep: safestep's Bound protocol sees only the output "
        "logits and slopes, while ρ_attn and ρ_ffn need internal tensors of the same JVP.",
        "Split: default_rng(42) permutation, 539 test / 1258 train (the reference's). Phases: the logged points of "
        "each seed cut into thirds (20/20/21 for 61 points; the paper's split is inferred).",
        "Modes: the full run trains the reference's canonical four (all-radii = min, output-only, fixed 1×, fixed "
        "16×); the attention-only and FFN-only controllers exist (BottleneckConfig.modes) but are not in it.",
        "Model: qkv bias-free, attention projection with bias (the reference code is ambiguous about the projection bias).",
    ]
    if config != FULL:
        notes.append(f"Reduced protocol (not the paper's): {asdict(config)}; the paper: 1200 steps, eval every 20, "
                     "full 1258-row batch, seeds 0..4.")
    return ExperimentResult(
        name="bottlenecks", title="Fig. 11 / Table 2: which radius binds in a tiny transformer",
        paper_ref="Ghosts of Softmax §6.6, Fig. 11, Table 2", protocol=protocol, config=asdict(config),
        seeds=list(config.seeds),
        metrics={"phases": table, "phases_per_seed": per_seed, "modes": modes, "seed_trajectories": trajectories,
                 "runs": [asdict(log) for log in logs]},
        claims=_claims(table, modes, trajectories, per_seed),
        figures={"radii": lambda: _radii_figure(minimum), "training": lambda: _training_figure(logs)} if minimum
        else {"training": lambda: _training_figure(logs)},
        notes=notes, seconds=time.perf_counter() - started,
    )


def run(options: RunOptions) -> ExperimentResult:
    """The full (paper) or quick protocol; ``options.seeds`` = N uses seeds 0..N-1."""
    config = QUICK if options.quick else FULL
    return run_config(replace(config, seeds=options.seed_tuple(config.seeds)), options)


EXPERIMENT = Experiment(
    name="bottlenecks",
    paper_ref="Ghosts of Softmax, Fig. 11 / Table 2",
    summary="Tiny transformer: ρ_out vs ρ_attn vs ρ_ffn set-mode controllers and which radius binds per phase",
    full_time=FULL_TIME,
    quick_time="≈ 25 s (≈ 2 min on the loaded machine)",
    run=run,
)
