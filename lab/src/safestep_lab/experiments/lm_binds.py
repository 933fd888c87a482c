"""Issue 9, lm-binds: what binds in a language model — which positions and tokens set ρ, r over training, and
how the radius of a probe subset compares with the full batch's.

Along AdamW's trajectory (lr 3e-3, no spike, byte-level GPT) a read-only ``SafeStep(mode="monitor")`` records τ,
ρ and r = τ/ρ of every step. Every ``every`` steps the step is also measured directly: the probe
(``safestep.probe.LogitProbe``) gives logits and slopes (B, T, V) at θ0 along Δθ/τ on the whole batch and
``Ghost().row_radii`` one radius per position; the binding position is the argmin. From it: its position t, input
byte, label byte and how frequent they are in the training text, the classes with the extreme slopes, and the ratio
ρ(subset)/ρ(full batch) for several subset rules (whole sequences by stride or by score, as SafeStep's
``probe_size``/``probe_select`` choose them, and position rules: every 8th position, random positions, the top
positions by a score of the training logits).
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from safestep.norm import global_norm

from safestep.bounds import Ghost
from safestep.probe import LogitProbe, choose_rows, row_scores
from safestep.telemetry import StepReport

from ..lm import lm_loss
from ..parallel import run_units
from ..report import Claim, ExperimentResult
from ..training import Batch, run_steps
from . import Experiment, RunOptions
from .lm_common import LMSetup, build_model, corpus_note, load_text, sig

__all__ = ["BindsConfig", "FULL", "QUICK", "RULES", "subset_radius", "run_seed", "summarize", "run", "EXPERIMENT"]

MONITOR = {"bound": "ghost", "probe_size": None, "method": "jvp"}
RULES = ("seq stride 1/16", "seq stride 4/16", "seq stride 8/16", "seq score 1/16", "seq score 4/16",
         "seq score 8/16", "every 8th position", "random 1/8 positions", "top 1/8 by logit range",
         "top 1/8 by label gap", "top 1/8 by small margin")
FIRST = 4  # "the first positions": t < FIRST
SPACE = 32


@dataclass(frozen=True)
class BindsConfig:
    """Seeds, steps, the analysis period, the LR and the data/model setup."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    every: int = 4
    lr: float = 3e-3
    setup: LMSetup = field(default_factory=LMSetup)


FULL = BindsConfig()
QUICK = BindsConfig(seeds=(0,), steps=24, every=4)


def _top_positions(score: torch.Tensor, share: int = 8) -> torch.Tensor:
    """Mask of the top 1/``share`` positions by ``score`` (B, T)."""
    flat = score.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(max(1, flat.numel() // share)).indices] = True
    return keep.reshape(score.shape)


def subset_radius(radii: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, float]:
    """ρ over each subset rule's rows (``RULES``), from the per-position radii (B, T) and the training logits."""
    batch, length = radii.shape
    out: dict[str, float] = {}
    seq_scores = row_scores(logits, labels)
    for k in (1, 4, 8):
        for kind, scores in (("stride", None), ("score", seq_scores)):
            rows = choose_rows(batch, k, scores, step)
            chosen = radii if rows is None else radii.index_select(0, rows)
            out[f"seq {kind} {k}/16"] = float(chosen.min())
    out["every 8th position"] = float(radii[:, ::8].min())
    generator = torch.Generator().manual_seed(step)
    pick = torch.randperm(batch * length, generator=generator)[: batch * length // 8]
    out["random 1/8 positions"] = float(radii.reshape(-1)[pick].min())
    z = logits.detach().float()
    label_logit = z.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    top2 = z.topk(2, dim=-1).values
    scores = {"top 1/8 by logit range": z.amax(-1) - z.amin(-1), "top 1/8 by label gap": z.amax(-1) - label_logit,
              "top 1/8 by small margin": top2[..., 1] - top2[..., 0]}
    for name, score in scores.items():
        out[name] = float(radii[_top_positions(score)].min())
    return out


def run_seed(seed: int, config: BindsConfig) -> dict[str, Any]:
    """One monitored AdamW trajectory with the direct per-position analysis every ``config.every`` steps."""
    from safestep import SafeStep

    setup = config.setup
    text = load_text(setup.tokenizer)
    counts = torch.bincount(text.train_ids, minlength=text.vocab_size).double()
    frequency = counts / counts.sum()
    model = build_model(setup, seed)
    sampler = text.sampler(setup.batch_size, setup.seq_len, seed=seed)
    inner = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=setup.weight_decay)
    guard = SafeStep(inner, model, mode="monitor", **MONITOR)
    probe, ghost = LogitProbe(model), Ghost()
    scale: dict[str, torch.Tensor] = {}

    def record_scale(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # the training forward only (probes run without gradients)
            scale["ln_f"] = args[0].detach().std(dim=-1)

    model.ln_f.register_forward_hook(record_scale)
    rows: list[dict[str, Any]] = []
    by_position: list[list[float]] = []
    min_by_position: list[list[float]] = []

    def monitored_step(batch: Batch) -> StepReport:
        """The monitor's step; every ``config.every`` steps also the direct per-position analysis of Δθ."""
        step, inputs, labels, logits = batch.step, batch.inputs, batch.labels, batch.logits
        analyse = step % config.every == 0
        theta0 = {name: p.detach().clone() for name, p in model.named_parameters()} if analyse else None
        guard.step(inputs=inputs, labels=labels)
        report = guard.last_report
        if theta0 is None:
            return report
        with torch.no_grad():
            delta = {name: p.detach() - theta0[name] for name, p in model.named_parameters()}
            tau = float(global_norm(list(delta.values())))
            slopes = probe(theta0, {name: d / tau for name, d in delta.items()}, inputs, "jvp")
            radii = ghost.row_radii(slopes.logits, slopes.slopes, labels).reshape(labels.shape)
            full = float(radii.min())
            b, t = divmod(int(radii.argmin()), labels.shape[1])
            a = slopes.slopes[b, t]
            label_freq = frequency[labels]
            ln_std = scale["ln_f"]
            log_spread = (slopes.slopes.amax(-1) - slopes.slopes.amin(-1)).double().log().reshape(-1)
            correlation = float(torch.corrcoef(torch.stack([ln_std.double().log().reshape(-1), log_spread]))[0, 1])
            row = {
                "step": step, "rho_full": full, "rho_guard": report.rho, "tau": tau, "position": t,
                "input": int(inputs[b, t]), "label": int(labels[b, t]),
                "label_frequency": float(frequency[labels[b, t]]),
                "label_frequency_percentile": float((label_freq < frequency[labels[b, t]]).double().mean()),
                "input_frequency_percentile": float((frequency[inputs] < frequency[inputs[b, t]]).double().mean()),
                "slope_max_class": int(a.argmax()), "slope_min_class": int(a.argmin()),
                "spread": float(a.max() - a.min()), "median_row_radius": float(radii.median()),
                "ln_f_std": float(ln_std[b, t]), "ln_f_std_median": float(ln_std.median()),
                "ln_f_std_percentile": float((ln_std < ln_std[b, t]).double().mean()),
                "corr_log_ln_f_std_log_spread": correlation,
                "share_rows_below_10x_min": float((radii < 10 * full).double().mean()),
                "ratios": {name: sig(value / full) for name, value in subset_radius(radii, logits.detach(), labels,
                                                                                   step).items()},
            }
            rows.append(row)
            by_position.append(radii.median(dim=0).values.tolist())
            min_by_position.append(radii.amin(dim=0).tolist())
        return report

    started = time.perf_counter()
    records = run_steps(model, inner, monitored_step, sampler.batch, config.steps, loss_fn=lm_loss)
    series = {"loss": [record.loss for record in records], "tau": [record.report.tau for record in records],
              "rho": [record.report.rho for record in records], "r": [record.report.r_proposed for record in records]}
    return {"seed": seed, "series": series, "rows": rows,
            "radius_by_position_median": np.median(by_position, axis=0).tolist(),  # over the analysed steps
            "radius_by_position_min": np.median(min_by_position, axis=0).tolist(),
            "seconds": time.perf_counter() - started, "class_frequency": frequency.tolist()}


def _char(byte: int) -> str:
    return {10: "\\n", 32: "space", 9: "\\t", 0: "EOS"}.get(byte, chr(byte) if 32 < byte < 127 else f"0x{byte:02x}")


def summarize(runs: list[dict[str, Any]], config: BindsConfig) -> dict[str, Any]:
    """Pooled over seeds: where the binding rows sit, what they are, r over training and the subset ratios."""
    rows = [row for run in runs for row in run["rows"]]
    length = config.setup.seq_len
    positions = np.asarray([row["position"] for row in rows])
    ratios = {name: np.asarray([row["ratios"][name] for row in rows]) for name in RULES}
    frequency = np.asarray(runs[0]["class_frequency"])
    extreme = Counter(row["slope_max_class"] for row in rows) + Counter(row["slope_min_class"] for row in rows)
    agreement = [abs(row["rho_guard"] - row["rho_full"]) / row["rho_full"] for row in rows]
    r = np.asarray([run["series"]["r"] for run in runs], dtype=float)
    thirds = np.array_split(np.arange(r.shape[1]), 3)
    return {
        "analysed_steps": len(rows),
        "position_histogram": np.bincount(positions, minlength=length).tolist(),
        "share_first_positions": float(np.mean(positions < FIRST)),
        "share_last_positions": float(np.mean(positions >= length - FIRST)),
        "uniform_share": FIRST / length,
        "median_position": float(np.median(positions)),
        "label_frequency_percentile_median": float(np.median([row["label_frequency_percentile"] for row in rows])),
        "input_frequency_percentile_median": float(np.median([row["input_frequency_percentile"] for row in rows])),
        "binding_labels_top": [(_char(k), v) for k, v in Counter(row["label"] for row in rows).most_common(5)],
        "share_binding_label_space": float(np.mean([row["label"] == SPACE for row in rows])),
        "space_frequency": float(frequency[SPACE]),
        "binding_inputs_top": [(_char(k), v) for k, v in Counter(row["input"] for row in rows).most_common(5)],
        "extreme_slope_classes_top": [(_char(k), v, float(frequency[k])) for k, v in extreme.most_common(6)],
        "rho_guard_vs_direct_max_rel_diff": float(max(agreement)),
        "ln_f_std_percentile_median": float(np.median([row["ln_f_std_percentile"] for row in rows])),
        "share_binding_at_smallest_ln_f_std": float(np.mean([row["ln_f_std_percentile"] == 0.0 for row in rows])),
        "ln_f_std_binding_over_median_median": float(np.median([row["ln_f_std"] / row["ln_f_std_median"]
                                                                for row in rows])),
        "corr_log_ln_f_std_log_spread_median": float(np.median([row["corr_log_ln_f_std_log_spread"] for row in rows])),
        "r_median_by_third": [float(np.nanmedian(r[:, idx])) for idx in thirds],
        "share_steps_r_above_1": float(np.mean(r > 1.0)),
        "r_max": float(np.nanmax(r)),
        "rho_median": float(np.nanmedian([run["series"]["rho"] for run in runs])),
        "share_steps_rho_below_0.01": float(np.mean(np.asarray([run["series"]["rho"] for run in runs]) < 0.01)),
        "median_row_radius_over_min": float(np.median([row["median_row_radius"] / row["rho_full"] for row in rows])),
        "share_rows_within_10x_of_min_median": float(np.median([row["share_rows_below_10x_min"] for row in rows])),
        "ratios": {name: {"median": float(np.median(v)), "p90": float(np.quantile(v, 0.9)),
                          "max": float(v.max()), "share_exact": float(np.mean(v <= 1.0 + 1e-12)),
                          "share_within_1.5x": float(np.mean(v <= 1.5))} for name, v in ratios.items()},
        "radius_by_position_median": np.median([run["radius_by_position_median"] for run in runs], axis=0).tolist(),
        "radius_by_position_min": np.median([run["radius_by_position_min"] for run in runs], axis=0).tolist(),
    }


def _claims(summary: dict, config: BindsConfig) -> list[Claim]:
    n = summary["analysed_steps"]
    protocol = (f"AdamW lr {config.lr:g}, {config.steps} steps, every {config.every}th step analysed "
                f"({n} steps pooled over {len(config.seeds)} seed(s)); whole batch probed: 16 × 64 positions")
    ratios = summary["ratios"]
    first, uniform = summary["share_first_positions"], summary["uniform_share"]
    r_thirds = summary["r_median_by_third"]
    agreement = summary["rho_guard_vs_direct_max_rel_diff"]
    best_rule = min(RULES, key=lambda name: (ratios[name]["p90"], ratios[name]["median"]))
    return [
        Claim("SafeStep's ρ is the minimum of the per-position ghost radii (probe + bound called directly)",
              "ρ = min over probed rows of π/Δ_a (definition)",
              f"max relative difference {agreement:.1e} over {n} steps",
              "holds" if agreement <= 1e-4 else "differs", protocol),
        Claim("which positions set ρ: the first positions?", "asked (rare tokens? the first positions?)",
              f"t < {FIRST} binds on {100 * first:.0f} % of steps (uniform {100 * uniform:.1f} %), last {FIRST} "
              f"positions {100 * summary['share_last_positions']:.0f} %; median binding position "
              f"{summary['median_position']:.0f} of {config.setup.seq_len}",
              "not in paper", protocol),
        Claim("what the binding positions have in common: a small input scale at the final LayerNorm",
              "asked (not in the issue)",
              f"the binding position has the batch's smallest ln_f input std on "
              f"{100 * summary['share_binding_at_smallest_ln_f_std']:.0f} % of steps (median percentile "
              f"{100 * summary['ln_f_std_percentile_median']:.1f} %, median std ratio to the batch median "
              f"{summary['ln_f_std_binding_over_median_median']:.2f}); correlation of log std with log slope spread "
              f"across positions, median over steps {summary['corr_log_ln_f_std_log_spread_median']:.2f}",
              "not in paper", protocol + "; std over the 64 features of the final LayerNorm's input in the "
              "training forward (LayerNorm divides by it, so its Jacobian grows as 1/std)"),
        Claim("which tokens set ρ: rare ones?", "asked (rare tokens?)",
              f"median share of the batch's labels strictly rarer than the binding row's label "
              f"{100 * summary['label_frequency_percentile_median']:.0f} % (its input byte: "
              f"{100 * summary['input_frequency_percentile_median']:.0f} %; a rare token would give ≈ 0 %); the "
              f"space byte is the binding label on {100 * summary['share_binding_label_space']:.0f} % of steps and "
              f"{100 * summary['space_frequency']:.0f} % of the text; commonest binding labels "
              + ", ".join(f"{c} ({k})" for c, k in summary["binding_labels_top"][:3])
              + "; classes with the extreme slopes " + ", ".join(f"{c} ({k})" for c, k, _ in
                                                               summary["extreme_slope_classes_top"][:4]),
              "not in paper", protocol + "; percentiles against the 1024 positions of the same batch, byte "
              "frequencies from the training text"),
        Claim("r = τ/ρ over training (AdamW 3e-3)", "asked",
              f"median r by thirds of training {', '.join(f'{v:.2g}' for v in r_thirds)}; r > 1 on "
              f"{100 * summary['share_steps_r_above_1']:.0f} % of steps, max {summary['r_max']:.3g}; ρ < 0.01 on "
              f"{100 * summary['share_steps_rho_below_0.01']:.0f} % of steps",
              "not in paper", f"every step of the monitored runs ({len(config.seeds)} seed(s))"),
        Claim("ρ(probe subset)/ρ(full batch)", "asked",
              "; ".join(f"{name}: median {v['median']:.3g}, p90 {v['p90']:.3g}, exact {100 * v['share_exact']:.0f} %"
                        for name, v in ratios.items()) + f". Tightest at p90: {best_rule}",
              "not in paper", protocol + "; ratio ≥ 1 always (a subset's minimum cannot be smaller); 'exact' = "
              "the subset contains the binding position"),
    ]


def _figure(summary: dict, runs: list[dict[str, Any]], config: BindsConfig):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 8.5), constrained_layout=True)
    (ax_r, ax_pos, ax_rad), (ax_ratio, ax_freq, ax_rho) = fig.subplots(2, 3)
    for run in runs:
        ax_r.semilogy(run["series"]["r"], lw=0.8, label=f"seed {run['seed']}")
        ax_rho.semilogy(run["series"]["rho"], lw=0.8, label=f"ρ, seed {run['seed']}")
    ax_r.axhline(1.0, color="black", ls="--", lw=0.8)
    ax_r.set(title="r = τ/ρ of AdamW's step (whole batch)", xlabel="step", ylabel="r")
    ax_rho.set(title="ρ (whole batch) over training", xlabel="step", ylabel="ρ")
    for ax in (ax_r, ax_rho):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    hist = summary["position_histogram"]
    ax_pos.bar(range(len(hist)), hist, color="tab:blue")
    ax_pos.axhline(sum(hist) / len(hist), color="black", ls="--", lw=0.8, label="uniform")
    ax_pos.set(title="position of the binding row", xlabel="position t", ylabel="analysed steps")
    ax_pos.legend(fontsize=7)
    ax_rad.semilogy(summary["radius_by_position_median"], label="median over the batch")
    ax_rad.semilogy(summary["radius_by_position_min"], label="min over the batch")
    ax_rad.set(title="per-position radius (median over analysed steps and seeds)", xlabel="position t", ylabel="π/Δ_a")
    ax_rad.legend(fontsize=7)
    ax_rad.grid(alpha=0.3)
    rows = [row for run in runs for row in run["rows"]]
    data = [[row["ratios"][name] for row in rows] for name in RULES]
    ax_ratio.boxplot(data, vert=False, whis=(5, 95), showfliers=False)
    ax_ratio.set_yticks(range(1, len(RULES) + 1), list(RULES))
    ax_ratio.set_xscale("log")
    ax_ratio.set(title="ρ(subset)/ρ(full batch) (5–95 % whiskers)", xlabel="ratio (1 = exact)")
    ax_ratio.tick_params(axis="y", labelsize=7)
    freq = np.asarray(runs[0]["class_frequency"])
    labels = [row["label"] for row in rows]
    bins = np.linspace(np.log10(freq[freq > 0].min()), np.log10(freq.max()) + 0.05, 31)
    ax_freq.hist(np.log10(freq[labels] + 1e-12), bins=bins, alpha=0.6, label="binding row's label", density=True)
    ax_freq.hist(np.log10(freq[freq > 0]), bins=bins, weights=freq[freq > 0], histtype="step", color="black",
                 density=True, label="every label (by frequency)")
    ax_freq.set(title="byte frequency (log10) of the binding row's label", xlabel="log10 frequency in training text",
                ylabel="density")
    ax_freq.legend(fontsize=7)
    fig.suptitle(f"What binds: byte-level GPT, AdamW {config.lr:g}, {len(config.seeds)} seed(s)")
    return fig


def run(options: RunOptions) -> ExperimentResult:
    """Every seed's monitored trajectory, the pooled summary, claims and figure."""
    started = time.perf_counter()
    config = QUICK if options.quick else FULL
    config = replace(config, seeds=options.seed_tuple(config.seeds))
    runs = run_units(run_seed, [(s, config) for s in config.seeds], options.worker_count(), options.report,
                     cache=options.cache, label=lambda u: f"seed {u[0]}")
    summary = summarize(runs, config)
    protocol = (
        f"{config.setup.describe()}. AdamW at lr {config.lr:g}, no spike, {config.steps} steps, monitored by "
        "SafeStep(mode='monitor', bound='ghost', probe_size=None, method='jvp') — the whole batch, 16 sequences × 64 "
        f"positions, each a row of 256 logits. Every {config.every}th step the same step is measured directly: "
        "LogitProbe(model)(θ0, Δθ/τ, inputs, 'jvp') → logits and slopes (16, 64, 256), Ghost().row_radii → one "
        "radius per position; ρ(full) = their minimum. Subset rules: whole sequences chosen as SafeStep chooses them "
        "(probe.choose_rows: a stride rotated every step, or the highest row_scores of the training logits with "
        "labels, i.e. the largest z_max − z_y of a sequence) for 1, 4 and 8 of 16 sequences; and position rules "
        "(a position subset is what a user gets by setting the labels of the other positions to -100): every 8th "
        "position, a random 1/8 of the positions, the top 1/8 of positions by the training logits' range "
        "z_max − z_min, by the label gap z_max − z_y, or by the smallest top-2 margin."
    )
    notes = [corpus_note(config.setup),
             "Positions of one sequence are probed together (a causal model's forward needs every earlier position), "
             "so a position subset saves no probe cost; it only changes which rows the minimum runs over.",
             "Byte 0 is the end-of-document marker of the byte tokenizer."]
    if options.quick:
        notes.append(f"Quick variant: 1 seed, {config.steps} steps (full: {len(FULL.seeds)} seeds, {FULL.steps} steps).")
    return ExperimentResult(
        name="lm-binds", title="What binds in a language model: positions, tokens, r and probe subsets",
        paper_ref="issue 9 (language models end to end), what binds", protocol=protocol, config=asdict(config),
        seeds=list(config.seeds), metrics={"summary": summary, "runs": runs}, claims=_claims(summary, config),
        figures={"lm_binds": lambda: _figure(summary, runs, config)}, notes=notes,
        seconds=time.perf_counter() - started)


EXPERIMENT = Experiment(
    name="lm-binds", paper_ref="issue 9: what binds in an LM",
    summary="which positions/tokens set ρ on a byte-level GPT, r over training, ρ(subset)/ρ(full) per subset rule",
    full_time="≈ 2 min, 2 workers on a busy 2-core machine (3 seeds × 400 steps)",
    quick_time="≈ 5 s", run=run)
