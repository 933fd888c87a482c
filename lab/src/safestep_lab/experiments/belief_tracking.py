"""Belief paper §10: tracking a target that shifts y1 → y2 on the 3-class simplex with Low, High and ADS steps.

The reconstruction of docs/reproduction.md: K = 3, uniform start, entropic mirror descent on E(p) = −Σ y_t log p
(``safestep_lab.simplex_dynamics.mirror_step``), y_t = y1 = (0.7, 0.2, 0.1) for t < 300 and y2 = (0.1, 0.2, 0.7) after, T = 600.
Strategies: Low (η = 0.02, below η_max(p_t) along the whole path), High (η = 1.5, far above it) and ADS-aware
(η_t = ads_step(p_t) = η_max(p_t)/(1 + α(B(p_t))), ε = 1e-10). Side studies: the High outcome as a function of η
(which vertex it collapses to, from η below every admissible bound up to 5), set against the bound η_max(y) of
every step rule in ``safestep.geometry.simplex.RULES`` (where collapse begins, and how conservative each bound
is), and the same strategies under the projected step (``projected_step``), the paper's theory model. Pure deterministic float64 math: no seeds, a few seconds in total.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from safestep.geometry import ads_step, max_step
from safestep.geometry.simplex import RULES
from ..report import Claim, ExperimentResult
from ..simplex_dynamics import mirror_step, projected_step
from . import Experiment, RunOptions

__all__ = [
    "Y1", "Y2", "STEPS", "SHIFT", "ADS_EPS", "Strategy", "MIRROR_STRATEGIES", "PGD_STRATEGIES", "Tracking",
    "kl_divergence", "high_sweep_etas", "sweep_etas", "bound_table", "track", "first_index", "end_state",
    "summarize", "outcome_ranges",
    "run", "EXPERIMENT",
]

Y1 = (0.7, 0.2, 0.1)
Y2 = (0.1, 0.2, 0.7)
STEPS = 600
SHIFT = 300
ADS_EPS = 1e-10
KL_TOLERANCES = (1e-3, 1e-4)
LINF_TOLERANCE = 0.01
RECOVERED_KL = 1e-3  # an end state with KL(y2‖p_T) below this counts as having tracked y2
SWEEP_RANGE = (0.1, 5.0, 0.02)  # High η sweep: start, stop (inclusive), step
LOW_SWEEP = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09)  # below SWEEP_RANGE


@dataclass(frozen=True)
class Strategy:
    """A step-size strategy: a fixed η, or the ADS-aware η_t = ads_step(p_t) when ``eta`` is None."""

    label: str
    eta: float | None


LOW = Strategy("Low 0.02", 0.02)
ADS = Strategy("ADS-aware", None)
HIGH = Strategy("High 1.5", 1.5)
MIRROR_STRATEGIES = (LOW, ADS, HIGH, Strategy("Low 0.01", 0.01), Strategy("High 2.5", 2.5))
PGD_STRATEGIES = (LOW, ADS, Strategy("High 0.3", 0.3), HIGH)
Update = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Tracking:
    """One batched run: beliefs (T+1, S, K) with p_0 uniform, and per step t the η_t used and η_max(p_t), (T, S)."""

    beliefs: Tensor
    etas: Tensor
    eta_max: Tensor
    shift: int


def kl_divergence(a: Tensor, b: Tensor) -> Tensor:
    """KL(a‖b) = Σ_k a_k log(a_k/b_k) over the last dimension (0·log 0 = 0; +inf where b_k = 0 < a_k).

    Clamped at 0: rounding can make the sum of a nearly equal pair slightly negative.
    """
    return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(dim=-1).clamp(min=0.0)


def high_sweep_etas() -> list[float]:
    """The High η grid of the sensitivity sweep: 0.10, 0.12, …, 5.00."""
    start, stop, step = SWEEP_RANGE
    return [round(start + i * step, 2) for i in range(int(round((stop - start) / step)) + 1)]


def sweep_etas() -> list[float]:
    """The whole fixed-η sweep: LOW_SWEEP (down past the tightest bound) followed by the High grid."""
    return [*LOW_SWEEP, *high_sweep_etas()]


def bound_table(etas: Sequence[float], sweep: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per rule of RULES: η_max at y1 and y2, the outcomes of every swept η at or below the bound, and where
    collapse begins (the smallest η ending on a vertex) as a multiple of the bound."""
    collapsing = [eta for eta, s in zip(etas, sweep) if s["end_state"].startswith("e")]
    first_collapse = min(collapsing, default=math.nan)
    tracking_below = [eta for eta, s in zip(etas, sweep) if s["end_state"] == "y2" and eta < first_collapse]
    table = {}
    for rule in RULES:
        at = {name: float(max_step(torch.tensor(y, dtype=torch.float64), rule)) for name, y in (("y1", Y1), ("y2", Y2))}
        bound = min(at.values())
        within = [s["end_state"] for eta, s in zip(etas, sweep) if eta <= bound]
        table[rule] = {"bound_at_y1": at["y1"], "bound_at_y2": at["y2"], "bound": bound,
                       "swept_at_or_below": len(within), "collapsed_at_or_below": sum(o.startswith("e") for o in within),
                       "tracked_at_or_below": within.count("y2"), "first_collapse": first_collapse,
                       "first_collapse_over_bound": first_collapse / bound,
                       "largest_tracking_below_collapse": max(tracking_below, default=math.nan)}
    return table


def track(update: Update, etas: Sequence[float | None], steps: int = STEPS, shift: int = SHIFT,
          y1: Sequence[float] = Y1, y2: Sequence[float] = Y2, eps: float = ADS_EPS) -> Tracking:
    """p_{t+1} = update(p_t, y_t, η_t), y_t = y1 for t < shift else y2, p_0 uniform; η_t fixed or ads_step(p_t).

    All strategies run as one batch (one row each); ``None`` in ``etas`` marks the ADS-aware rows.
    """
    if not 0 < shift < steps:
        raise ValueError(f"the shift must fall strictly inside the run, got shift={shift}, steps={steps}")
    if len(y1) != len(y2):
        raise ValueError(f"y1 and y2 must have the same number of classes, got {len(y1)} and {len(y2)}")
    n, k = len(etas), len(y1)
    is_ads = torch.tensor([e is None for e in etas])
    fixed = torch.tensor([0.0 if e is None else float(e) for e in etas], dtype=torch.float64)
    targets = [torch.tensor(y, dtype=torch.float64).expand(n, k) for y in (y1, y2)]
    p = torch.full((n, k), 1.0 / k, dtype=torch.float64)
    beliefs, used, bounds = [p], [], []
    for t in range(steps):
        eta = torch.where(is_ads, ads_step(p, eps=eps), fixed)
        used.append(eta)
        bounds.append(max_step(p))
        p = update(p, targets[int(t >= shift)], eta)
        beliefs.append(p)
    return Tracking(torch.stack(beliefs), torch.stack(used), torch.stack(bounds), shift)


def first_index(mask: Tensor) -> int | None:
    """min{s : mask[s]} for a 1-D boolean tensor, None if it is never true."""
    hits = torch.nonzero(mask)
    return int(hits[0]) if len(hits) else None


def _vertex(p: Tensor) -> str | None:
    """"e<i>" if p is (numerically exactly) the vertex e_i, else None."""
    return f"e{int(p.argmax()) + 1}" if float(p.max()) == 1.0 else None


def end_state(previous: Tensor, last: Tensor, y2: Tensor) -> str:
    """The end of a run from (p_{T−1}, p_T): "e<i>" stuck, "e<i>↔e<j>" vertex 2-cycle, "y2" or "interior".

    "y2" means KL(y2‖p_T) < 1e-3 (the run tracked the new target).
    """
    a, b = _vertex(previous), _vertex(last)
    if a is not None and b is not None:
        return b if a == b else f"{b}↔{a}"
    return "y2" if float(kl_divergence(y2, last)) < RECOVERED_KL else "interior"


def _absorbed_at(beliefs: Tensor) -> int | None:
    """The first t from which p_t never changes again, if the run ends stuck on a vertex (None otherwise)."""
    final = beliefs[-1]
    if _vertex(final) is None or not torch.equal(beliefs[-2], final):
        return None
    moving = torch.nonzero((beliefs != final).any(dim=-1))
    return int(moving[-1]) + 1 if len(moving) else 0


def summarize(tracking: Tracking, row: int, y1: Sequence[float] = Y1, y2: Sequence[float] = Y2) -> dict[str, Any]:
    """The §10 numbers of one strategy: p at the shift and at T, steps after the shift to each tolerance, end KLs."""
    target1, target2 = (torch.tensor(y, dtype=torch.float64) for y in (y1, y2))
    beliefs = tracking.beliefs[:, row]
    after = beliefs[tracking.shift:]
    p_shift, p_end = beliefs[tracking.shift], beliefs[-1]
    kl_after = kl_divergence(target2.expand_as(after), after)
    linf_after = (after - target2).abs().amax(dim=-1)
    etas, bounds = tracking.etas[:, row], tracking.eta_max[:, row]
    return {
        "p_at_shift": p_shift.tolist(),
        "p_at_end": p_end.tolist(),
        "kl_y1_p_at_shift": float(kl_divergence(target1, p_shift)),
        **{f"steps_to_kl_{tol:g}": first_index(kl_after < tol) for tol in KL_TOLERANCES},
        f"steps_to_linf_{LINF_TOLERANCE:g}": first_index(linf_after < LINF_TOLERANCE),
        "kl_y2_p_end": float(kl_divergence(target2, p_end)),
        "kl_p_end_y2": float(kl_divergence(p_end, target2)),
        "share_eta_above_eta_max": float((etas > bounds).double().mean()),
        "eta_min": float(etas.min()),
        "eta_max_used": float(etas.max()),
        "min_eta_max_along_path": float(bounds.min()),
        "kl_p_y2_last_two": [float(kl_divergence(p, target2)) for p in beliefs[-2:]],
        "end_state": end_state(beliefs[-2], p_end, target2),
        "absorbed_at": _absorbed_at(beliefs),
    }


def outcome_ranges(etas: Sequence[float], outcomes: Sequence[str]) -> list[tuple[float, float, str]]:
    """Runs of consecutive equal outcomes along the η grid, as (first η, last η, outcome)."""
    if len(etas) != len(outcomes):
        raise ValueError(f"need one outcome per η, got {len(etas)} η and {len(outcomes)} outcomes")
    ranges: list[tuple[float, float, str]] = []
    for eta, outcome in zip(etas, outcomes):
        if ranges and ranges[-1][2] == outcome:
            ranges[-1] = (ranges[-1][0], eta, outcome)
        else:
            ranges.append((eta, eta, outcome))
    return ranges


# ------------------------------------------------------------------------------------------------------------
# Figures


def _barycentric(p: Tensor) -> tuple[Tensor, Tensor]:
    """2-D coordinates of beliefs in an equilateral triangle with e1 at the left, e2 at the right, e3 on top."""
    return p[..., 1] + 0.5 * p[..., 2], (math.sqrt(3) / 2) * p[..., 2]


def _simplex_panel(ax: Any, beliefs: Tensor, shift: int, title: str) -> None:
    corners = torch.eye(3, dtype=torch.float64)
    cx, cy = _barycentric(torch.cat([corners, corners[:1]]))
    ax.plot(cx.numpy(), cy.numpy(), color="0.6", lw=0.8)
    for i, (x, y) in enumerate(zip(cx[:3].tolist(), cy[:3].tolist())):
        ax.annotate(f"e{i + 1}", (x, y), textcoords="offset points", xytext=(-14 if i == 0 else 4, -4 if i < 2 else 4))
    for part, color, label in ((beliefs[: shift + 1], "tab:blue", "t ≤ shift (target y1)"),
                               (beliefs[shift:], "tab:orange", "t ≥ shift (target y2)")):
        x, y = _barycentric(part)
        ax.plot(x.numpy(), y.numpy(), "-o", color=color, ms=2, lw=0.8, alpha=0.8, label=label)
    for y_t, marker, name in ((Y1, "*", "y1"), (Y2, "P", "y2")):
        x, y = _barycentric(torch.tensor(y_t, dtype=torch.float64))
        ax.plot(float(x), float(y), marker, color="k", ms=11, label=name)
    x_end, y_end = _barycentric(beliefs[-1])
    ax.plot(float(x_end), float(y_end), "s", color="tab:red", ms=7, mfc="none", mew=1.5, label="p_T")
    ax.set_title(title, fontsize=10, pad=14)
    ax.set_aspect("equal")
    ax.axis("off")


def _trajectory_figure(tracking: Tracking, strategies: Sequence[Strategy], rows: Sequence[int], suptitle: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6 * len(rows), 3.9))
    axes = fig.subplots(1, len(rows))
    for ax, strategy, row in zip(axes, strategies, rows):
        _simplex_panel(ax, tracking.beliefs[:, row], tracking.shift, strategy.label)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(suptitle, fontsize=11)
    return fig


def _kl_figure(tracking: Tracking, strategies: Sequence[Strategy], rows: Sequence[int]) -> Any:
    from matplotlib.figure import Figure

    steps = tracking.beliefs.shape[0]
    t = torch.arange(steps)
    targets = torch.tensor([Y1] * (tracking.shift + 1) + [Y2] * (steps - tracking.shift - 1), dtype=torch.float64)
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for strategy, row in zip(strategies, rows):
        p = tracking.beliefs[:, row]
        left.semilogy(t.numpy(), kl_divergence(targets, p).clamp(min=1e-17).numpy(), label=strategy.label, lw=1.2)
        right.semilogy(t.numpy(), kl_divergence(p, targets).clamp(min=1e-17).numpy(), label=strategy.label, lw=1.2)
    right.axhline(math.log(10), color="k", ls=":", lw=1, label="ln 10 = −log y2[e1]")
    for ax, title in ((left, "KL(y_t ‖ p_t)  (+inf off the plot once a class is lost)"), (right, "KL(p_t ‖ y_t)")):
        ax.axvline(tracking.shift, color="0.5", ls="--", lw=1)
        ax.set_xlabel("step t (target shifts y1 → y2 at the dashed line)")
        ax.set_ylabel("KL (nats, log scale)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(1e-12, 1e2)
        ax.grid(alpha=0.3)
    right.legend(fontsize=8)
    return fig


def _step_figure(tracking: Tracking, strategies: Sequence[Strategy], rows: Sequence[int]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.9 * len(rows), 3.8))
    axes = fig.subplots(1, len(rows))
    t = torch.arange(tracking.etas.shape[0])
    for ax, strategy, row in zip(axes, strategies, rows):
        bound = tracking.eta_max[:, row]
        ax.semilogy(t.numpy(), tracking.etas[:, row].numpy(), label="η_t used", color="tab:blue")
        ax.semilogy(t[bound > 0].numpy(), bound[bound > 0].numpy(), label="η_max(p_t) (paper certificate)",
                    color="tab:red", ls="--")
        ax.axvline(tracking.shift, color="0.5", ls=":", lw=1)
        ax.set_title(strategy.label, fontsize=10)
        ax.set_xlabel("step t")
        ax.grid(alpha=0.3)
        ax.set_ylabel("step size (log scale)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Step used vs the admissible bound along each trajectory (η_max = 0 after a collapse is not drawn)",
                 fontsize=10)
    return fig


def _sweep_figure(etas: Sequence[float], sweep: Sequence[dict[str, Any]], bounds: dict[str, dict[str, Any]]) -> Any:
    from matplotlib.figure import Figure

    colors = {"e1": "tab:red", "e2": "tab:green", "e3": "tab:purple", "y2": "tab:blue", "interior": "0.5"}
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    for state, color in colors.items():
        chosen = [(eta, s["kl_p_end_y2"]) for eta, s in zip(etas, sweep) if s["end_state"] == state]
        if chosen:
            x, y = zip(*chosen)
            ax.plot(x, y, "o", ms=3, color=color, label="tracks y2" if state == "y2" else f"ends at {state}")
    ax.axhline(math.log(10), color="k", ls=":", lw=1, label="ln 10 (the paper's 'above 2.3')")
    for (rule, row), style in zip(bounds.items(), ("--", "-.", ":", (0, (5, 1)), (0, (1, 3)))):
        ax.axvline(row["bound"], color="0.3", ls=style, lw=1, label=f"η_max(y), {rule} rule = {row['bound']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("fixed step η (log scale)")
    ax.set_ylabel("KL(p_T ‖ y2) (nats)")
    ax.set_title("Mirror descent: where a fixed step ends after the shift (T = 600), vs the admissible bounds",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ------------------------------------------------------------------------------------------------------------
# The experiment


def _fmt_p(p: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in p) + ")"


def _fmt_range(first: float, last: float) -> str:
    return f"{first:g}" if first == last else f"{first:g}–{last:g}"


def _fmt_steps(s: dict[str, Any]) -> str:
    keys = [f"steps_to_kl_{tol:g}" for tol in KL_TOLERANCES] + [f"steps_to_linf_{LINF_TOLERANCE:g}"]
    return " / ".join("never" if s[k] is None else str(s[k]) for k in keys)


def _outcome(s: dict[str, Any]) -> str:
    if s["end_state"] in ("y2", "interior"):
        return "tracks y2" if s["end_state"] == "y2" else "interior"
    return f"{s['end_state']} (KL(p_T‖y2)={s['kl_p_end_y2']:.3f})"


def _strategy_line(update: str, label: str, s: dict[str, Any]) -> str:
    return (f"{update} {label}: p at shift {_fmt_p(s['p_at_shift'])}, "
            f"p at T {_fmt_p(s['p_at_end'])} ({s['end_state']}); "
            f"steps after shift to KL(y2‖p)<1e-3 / <1e-4 / ‖p−y2‖∞<0.01: {_fmt_steps(s)}; "
            f"KL(y2‖p_T)={s['kl_y2_p_end']:.3g}, KL(p_T‖y2)={s['kl_p_end_y2']:.3g}; "
            f"share of steps with η_t>η_max(p_t): {s['share_eta_above_eta_max']:.2f}")


def _pgd_verdict(high: dict[str, Any]) -> str:
    if not high["end_state"].startswith("e"):
        return "differs"
    return "holds" if min(high["kl_p_y2_last_two"]) > 2.3 else "partly"


def _bound_claims(table: dict[str, dict[str, Any]]) -> list[Claim]:
    claims = []
    for rule, row in table.items():
        safe = row["collapsed_at_or_below"] == 0
        claims.append(Claim(
            f"Fixed η at or below η_max ({rule} rule) never collapses; how conservative the bound is",
            "η ≤ η_max is admissible (sufficient, no number)" if rule == "paper" else "not in paper (rule of ours)",
            f"η_max(y1) = η_max(y2) = {row['bound']:.4g}: {row['swept_at_or_below']} swept η at or below it, "
            f"{row['tracked_at_or_below']} track y2, {row['collapsed_at_or_below']} collapse; collapse begins at "
            f"η = {row['first_collapse']:g} = {row['first_collapse_over_bound']:.1f}× the bound (largest tracking η "
            f"below it {row['largest_tracking_below_collapse']:g})",
            ("holds" if safe else "differs") if rule == "paper" else "not in paper",
            "MD, fixed η swept (LOW_SWEEP ∪ 0.10–5.00 step 0.02); bound = max_step(y, rule) at the two targets"))
    return claims


def _claims(md: dict[str, dict[str, Any]], pgd: dict[str, dict[str, Any]], etas: list[float],
            sweep: list[dict[str, Any]]) -> list[Claim]:
    low, ads, high = md[LOW.label], md[ADS.label], md[HIGH.label]
    protocol = "MD, T=600, shift at 300, uniform start; docs/reproduction.md reconstruction"
    high_holds = high["end_state"].startswith("e") and high["kl_p_end_y2"] > 2.3
    tracks = [s["kl_y1_p_at_shift"] < 1e-4 and s["kl_y2_p_end"] < 1e-4 for s in (low, ads)]
    low_steps, ads_steps = low["steps_to_kl_0.001"], ads["steps_to_kl_0.001"]
    faster = ads_steps is not None and (low_steps is None or ads_steps < low_steps)
    collapsing = [eta for eta, s in zip(etas, sweep) if s["end_state"].startswith("e")]
    recovering = [eta for eta, s in zip(etas, sweep) if s["end_state"] == "y2"]
    ln10 = [eta for eta, s in zip(etas, sweep) if s["end_state"] == "e1"]
    pgd_high = pgd[HIGH.label]
    return [
        Claim("High η collapses to a vertex; KL stays above 2.3", "KL(p‖y2) 'above 2.3' (η stripped)",
              f"η=1.5: p_T={_fmt_p(high['p_at_end'])} ({high['end_state']}, absorbed from t={high['absorbed_at']}), "
              f"KL(p_T‖y2)={high['kl_p_end_y2']:.6f} (ln 10={math.log(10):.6f})",
              "holds" if high_holds else "differs", protocol),
        Claim("Low η (below η_max throughout) tracks both targets", "tracks y1 and y2 (no numbers)",
              f"KL(y1‖p_300)={low['kl_y1_p_at_shift']:.2e}, KL(y2‖p_T)={low['kl_y2_p_end']:.2e}, "
              f"share η>η_max={low['share_eta_above_eta_max']:.2f}", "holds" if tracks[0] else "differs", protocol),
        Claim("ADS-aware η tracks both targets without tuning", "tracks y1 and y2 (no numbers)",
              f"KL(y1‖p_300)={ads['kl_y1_p_at_shift']:.2e}, KL(y2‖p_T)={ads['kl_y2_p_end']:.2e}, "
              f"η_t∈[{ads['eta_min']:.4f}, {ads['eta_max_used']:.4f}]", "holds" if tracks[1] else "differs", protocol),
        Claim("ADS-aware re-adapts faster than Low", "faster (no numbers)",
              f"steps after shift to KL(y2‖p)<1e-3 / <1e-4 / ‖p−y2‖∞<0.01: ADS {_fmt_steps(ads)}, "
              f"Low {_fmt_steps(low)}", "holds" if faster else "differs", protocol),
        Claim("High exceeds the bound initially and after convergence", "exceeds η_max (no numbers)",
              f"share of steps with η>η_max(p_t): High {high['share_eta_above_eta_max']:.2f}, "
              f"Low {low['share_eta_above_eta_max']:.2f}, ADS {ads['share_eta_above_eta_max']:.2f}",
              "holds" if high["share_eta_above_eta_max"] > 0.99 and low["share_eta_above_eta_max"] == 0 else "differs",
              protocol),
        Claim("Sensitivity: the fixed-η outcome over the whole sweep (0.005–5)", "one unstated η",
              f"collapse to a vertex for {len(collapsing)}/{len(etas)} η "
              f"(smallest {min(collapsing, default=math.nan)}); "
              f"recovers to y2 for {len(recovering)}; 'above 2.3' (vertex e1, KL = ln 10) only for {len(ln10)} η: "
              "the 2.3 is a property of the chosen η = 1.5, not of collapse",
              "partly", "MD, same protocol, fixed η swept; the vertex reached is chaotic in η"),
        Claim("Same collapse under the projected step (the theory model)", "KL 'above 2.3'",
              f"PGD η=1.5: ends in {pgd_high['end_state']}, KL(p‖y2) alternates "
              + "/".join(f"{v:.4f}" for v in pgd_high["kl_p_y2_last_two"])
              + f"; ADS {_fmt_steps(pgd[ADS.label])}, Low {_fmt_steps(pgd[LOW.label])} steps",
              _pgd_verdict(pgd_high), "projected_step instead of mirror_step, same protocol"),
    ]


def run(options: RunOptions) -> ExperimentResult:
    """Run the §10 tracking experiment (the quick variant is the full run: it takes seconds)."""
    started = time.perf_counter()
    etas = sweep_etas()
    md_strategies = list(MIRROR_STRATEGIES) + [Strategy(f"sweep {eta}", eta) for eta in etas]
    options.report(0, 2, "mirror descent")
    md_run = track(mirror_step, [s.eta for s in md_strategies])
    options.report(1, 2, "projected step")
    pgd_run = track(projected_step, [s.eta for s in PGD_STRATEGIES])
    options.report(2, 2, "done")

    md = {s.label: summarize(md_run, i) for i, s in enumerate(MIRROR_STRATEGIES)}
    pgd = {s.label: summarize(pgd_run, i) for i, s in enumerate(PGD_STRATEGIES)}
    offset = len(MIRROR_STRATEGIES)
    sweep = [summarize(md_run, offset + i) for i in range(len(etas))]
    outcomes = [_outcome(s) for s in sweep]
    sweep_table = [{"eta_from": a, "eta_to": b, "outcome": o} for a, b, o in outcome_ranges(etas, outcomes)]
    bounds = bound_table(etas, sweep)

    main_rows = [md_strategies.index(s) for s in (LOW, ADS, HIGH)]
    main = [LOW, ADS, HIGH]
    figures: dict[str, Callable[[], Any]] = {
        "trajectories": lambda: _trajectory_figure(md_run, main, main_rows, "Entropic mirror descent on the simplex"),
        "kl_vs_step": lambda: _kl_figure(md_run, main, main_rows),
        "eta_vs_eta_max": lambda: _step_figure(md_run, main, main_rows),
        "high_eta_sweep": lambda: _sweep_figure(etas, sweep, bounds),
        "pgd_trajectories": lambda: _trajectory_figure(pgd_run, PGD_STRATEGIES, range(len(PGD_STRATEGIES)),
                                                       "Projected gradient step (theory model) on the simplex"),
    }
    notes = [_strategy_line("MD", s.label, md[s.label]) for s in MIRROR_STRATEGIES]
    notes += [_strategy_line("PGD", s.label, pgd[s.label]) for s in PGD_STRATEGIES]
    notes.append("Fixed η sweep (MD), end state by η range: "
                 + "; ".join(f"{_fmt_range(r['eta_from'], r['eta_to'])}: {r['outcome']}" for r in sweep_table))
    notes += [
        "Deterministic float64 math: seeds are irrelevant (--seeds is ignored) and --quick runs the full experiment.",
        "The paper's numbers (targets, η values, T, KL direction) are stripped from the text; we follow the "
        "reconstruction of docs/reproduction.md: y1=(0.7,0.2,0.1), y2=(0.1,0.2,0.7), T=600, shift at 300, "
        "η_low=0.02, η_high=1.5, ADS ε=1e-10, reported KL = KL(p_t‖y_t) (KL(y_t‖p_t) is +inf at a vertex).",
        "The absorbing vertex is a float64 effect: the other coordinates underflow to exactly 0 and a multiplicative "
        "update never revives a 0 (a high-precision run keeps hopping between vertices, docs/reproduction.md).",
        "Steps after the shift count s = t − 300 for the first belief p_t meeting the tolerance.",
        "docs/reproduction.md reports MD collapse for η ≥ 0.8 and recovery for 0.5–0.7; our grid (batched float64) "
        "collapses from η = 0.74, and otherwise matches its vertex table (1.30–1.42 e3, 1.44–1.54 e1, 1.56–1.60 e2, "
        "2.0 e2, 2.25–4.0 e1, 4.25–4.5 e2, ≥ 4.75 e3). The exact vertex is chaotic in η and sensitive to rounding.",
        "Under the projected step a high η does not stick to one vertex: it ends in a 2-cycle between vertices "
        "(docs/reproduction.md reads the even-step state e2 as the end point); KL(p‖y2) then alternates, never ln 10.",
        "Extra rows Low 0.01 and High 2.5 are from the reconstruction's table (docs/reproduction.md); High 0.3 is the PGD row it discusses.",
    ]
    return ExperimentResult(
        name="belief-tracking",
        title="Belief tracking under a target shift: Low, High and ADS-aware steps (belief paper §10)",
        paper_ref="arXiv 2605.06741 §10 (reconstructed in docs/reproduction.md)",
        protocol=("K=3, p_0 uniform, p_{t+1} ∝ p_t·exp(η_t·y_t/max(p_t,1e-12)) (entropic mirror descent on CE), "
                  "y_t = (0.7,0.2,0.1) for t<300 then (0.1,0.2,0.7), T=600. Low η=0.02, High η=1.5, "
                  "ADS-aware η_t = η_max(p_t)/(1+α(B(p_t))) with η_max = 2·min p²/max p, α = −log(1−B+1e-10). "
                  "Side studies: High η swept over [0.1, 5] in steps of 0.02; the same strategies with the projected "
                  "step Π_Δ(p + η·y/p)."),
        config={"y1": Y1, "y2": Y2, "steps": STEPS, "shift": SHIFT, "ads_eps": ADS_EPS, "start": "uniform",
                "mirror_strategies": [(s.label, s.eta) for s in MIRROR_STRATEGIES],
                "pgd_strategies": [(s.label, s.eta) for s in PGD_STRATEGIES],
                "high_sweep": {"from": SWEEP_RANGE[0], "to": SWEEP_RANGE[1], "step": SWEEP_RANGE[2]},
                "low_sweep": list(LOW_SWEEP), "rules": list(RULES),
                "gradient_floor": 1e-12, "quick": options.quick},
        seeds=[],
        metrics={"mirror_descent": md, "projected_step": pgd, "high_sweep_ranges": sweep_table, "bounds": bounds,
                 "high_sweep": [{"eta": eta, "end_state": s["end_state"], "kl_p_end_y2": s["kl_p_end_y2"],
                                 "absorbed_at": s["absorbed_at"]} for eta, s in zip(etas, sweep)]},
        claims=_claims(md, pgd, etas, sweep) + _bound_claims(bounds),
        figures=figures,
        notes=notes,
        seconds=time.perf_counter() - started,
    )


EXPERIMENT = Experiment(
    name="belief-tracking",
    paper_ref="Belief space, §10",
    summary="K=3 belief tracking a shifting target: High η collapses to a vertex, Low and ADS-aware track, ADS faster",
    full_time="~5 s",
    quick_time="~5 s (same as full)",
    run=run,
)
