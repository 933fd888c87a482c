"""belief-tracking (belief paper §10): checked against an independent numpy simulation and closed forms."""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from safestep_lab.simplex_dynamics import mirror_step
from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments.belief_tracking import (
    SHIFT, STEPS, Y1, Y2, end_state, first_index, kl_divergence, outcome_ranges, run, track,
)
from safestep.geometry.simplex import RULES
from safestep_lab.experiments.belief_slice import K3_REFERENCE
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def result():
    return run(RunOptions(quick=True))


def _np_kl(a: np.ndarray, b: np.ndarray) -> float:
    mask = a > 0
    return float(np.sum(a[mask] * np.log(a[mask] / b[mask])))


def _np_ads(p: np.ndarray, eps: float = 1e-10) -> float:
    k = len(p)
    deficit = float(np.sum(p * np.log(k * p))) / math.log(k)  # 1 − B = KL(p‖uniform)/log K
    return 2 * p.min() ** 2 / p.max() / (1 - math.log(deficit + eps))


def _np_mirror(p: np.ndarray, y: np.ndarray, eta: float) -> np.ndarray:
    z = np.log(p) + eta * y / np.maximum(p, 1e-12)
    q = np.exp(z - z.max())
    return q / q.sum()


def _np_run(eta: float | None, steps: int = STEPS, shift: int = SHIFT) -> np.ndarray:
    p = np.full(3, 1 / 3)
    out = [p]
    for t in range(steps):
        y = np.array(Y1 if t < shift else Y2)
        p = _np_mirror(p, y, _np_ads(p) if eta is None else eta)
        out.append(p)
    return np.array(out)


def test_registered():
    assert REGISTRY["belief-tracking"] == "safestep_lab.experiments.belief_tracking"
    assert load("belief-tracking").name == "belief-tracking"


def test_kl_divergence_closed_forms():
    a = torch.tensor([0.5, 0.5], dtype=torch.float64)
    b = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert float(kl_divergence(a, b)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-14)
    assert float(kl_divergence(a, a)) == 0.0
    assert float(kl_divergence(a, torch.tensor([1.0, 0.0], dtype=torch.float64))) == math.inf
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert float(kl_divergence(e1, torch.tensor(Y2, dtype=torch.float64))) == pytest.approx(math.log(10), abs=1e-15)


def test_track_matches_an_independent_numpy_simulation():
    ours = track(mirror_step, [0.02, None])
    for column, eta in enumerate([0.02, None]):
        reference = _np_run(eta)
        np.testing.assert_allclose(ours.beliefs[:, column].numpy(), reference, rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours.etas[:, 1].numpy(), [_np_ads(p) for p in _np_run(None)[:-1]], rtol=1e-9)
    assert torch.all(ours.etas[:, 0] == 0.02)


def test_track_rejects_a_shift_outside_the_run():
    with pytest.raises(ValueError, match="shift"):
        track(mirror_step, [0.02], steps=10, shift=10)
    with pytest.raises(ValueError, match="same number of classes"):
        track(mirror_step, [0.02], y1=(0.5, 0.5), y2=Y2)


def test_steps_after_shift_agree_with_numpy(result):
    md = result.metrics["mirror_descent"]
    for label, eta in (("Low 0.02", 0.02), ("ADS-aware", None)):
        after = _np_run(eta)[SHIFT:]
        kl = np.array([_np_kl(np.array(Y2), p) for p in after])
        linf = np.abs(after - np.array(Y2)).max(axis=1)
        assert md[label]["steps_to_kl_0.001"] == int(np.argmax(kl < 1e-3))
        assert md[label]["steps_to_kl_0.0001"] == int(np.argmax(kl < 1e-4))
        assert md[label]["steps_to_linf_0.01"] == int(np.argmax(linf < 0.01))


def test_high_collapses_to_e1_with_kl_ln10(result):
    high = result.metrics["mirror_descent"]["High 1.5"]
    assert high["end_state"] == "e1" and high["p_at_end"] == [1.0, 0.0, 0.0]
    assert high["kl_p_end_y2"] == pytest.approx(math.log(10), abs=1e-6)
    assert high["kl_y2_p_end"] == math.inf
    assert high["absorbed_at"] is not None and SHIFT < high["absorbed_at"] < SHIFT + 10
    assert high["steps_to_kl_0.001"] is None
    # it converged to y1 in phase 1 (|1 − η| = 0.5 < 1 locally) before collapsing after the shift
    assert high["kl_y1_p_at_shift"] < 1e-12


def test_low_and_ads_track_both_targets_and_ads_is_faster(result):
    md = result.metrics["mirror_descent"]
    low, ads = md["Low 0.02"], md["ADS-aware"]
    for s in (low, ads):
        assert s["kl_y1_p_at_shift"] < 1e-4 and s["kl_y2_p_end"] < 1e-4
        assert s["end_state"] == "y2"
        assert s["share_eta_above_eta_max"] == 0.0
    for key in ("steps_to_kl_0.001", "steps_to_kl_0.0001", "steps_to_linf_0.01"):
        assert ads[key] < low[key] <= STEPS - SHIFT
    assert md["High 1.5"]["share_eta_above_eta_max"] > 0.99
    assert md["Low 0.01"]["steps_to_kl_0.001"] is None  # too slow: not within the 300 post-shift steps


def test_pgd_variant_collapses_into_a_vertex_cycle_without_ln10(result):
    pgd = result.metrics["projected_step"]
    assert pgd["High 1.5"]["end_state"] in ("e2↔e3", "e3↔e2")
    assert sorted(pgd["High 1.5"]["kl_p_y2_last_two"]) == pytest.approx([-math.log(0.7), -math.log(0.2)], abs=1e-12)
    for label in ("Low 0.02", "ADS-aware"):
        assert pgd[label]["kl_y2_p_end"] < 1e-4


def test_sweep_collapses_for_large_steps_and_recovers_for_small(result):
    sweep = {row["eta"]: row for row in result.metrics["high_sweep"]}
    assert all(sweep[eta]["end_state"] == "y2" for eta in (0.03, 0.1, 0.3, 0.5, 0.7))
    assert all(sweep[eta]["end_state"] in ("e1", "e2", "e3") for eta in (0.9, 1.5, 2.5, 4.0, 5.0))
    assert sweep[1.5]["end_state"] == "e1"


def test_claim_verdicts(result):
    verdicts = [c.verdict for c in result.claims]
    assert verdicts[:5] == ["holds"] * 5
    assert verdicts[5:7] == ["partly", "partly"]
    assert verdicts[7:] == ["holds"] + ["not in paper"] * (len(RULES) - 1)  # one row per rule, paper's first
    assert result.seeds == []


def test_every_rule_bound_matches_the_printed_k3_values_and_no_eta_below_it_collapses(result):
    """η_max(y1) per rule against MATH_BELIEF.md §3's printed values; the sweep reaches below every bound."""
    printed = dict(zip(("paper", "sharp", "tangent"), K3_REFERENCE[(0.7, 0.2, 0.1)]))
    bounds = result.metrics["bounds"]
    assert list(bounds) == list(RULES)
    for rule, value in printed.items():
        assert bounds[rule]["bound_at_y1"] == pytest.approx(value, rel=1e-3)
    for row in bounds.values():
        assert row["swept_at_or_below"] > 0 and row["collapsed_at_or_below"] == 0
        # measured: collapse begins at η = 0.74, 26× the paper bound 2/70 and ≈ 3× the sharp and tangent bounds
        assert row["first_collapse"] == pytest.approx(0.74)
        assert row["first_collapse"] > row["bound"]
    assert bounds["paper"]["first_collapse_over_bound"] == pytest.approx(0.74 / (2 * 0.1**2 / 0.7))


def test_end_state_and_first_index():
    e1, e2 = torch.eye(3, dtype=torch.float64)[:2]
    y2 = torch.tensor(Y2, dtype=torch.float64)
    assert end_state(e1, e1, y2) == "e1"
    assert end_state(e1, e2, y2) == "e2↔e1"
    assert end_state(y2, y2, y2) == "y2"
    assert end_state(y2, torch.tensor(Y1, dtype=torch.float64), y2) == "interior"
    assert first_index(torch.tensor([False, False, True, True])) == 2
    assert first_index(torch.tensor([False, False])) is None


def test_outcome_ranges():
    ranges = outcome_ranges([0.1, 0.2, 0.3, 0.4], ["a", "a", "b", "a"])
    assert ranges == [(0.1, 0.2, "a"), (0.3, 0.3, "b"), (0.4, 0.4, "a")]
    with pytest.raises(ValueError, match="one outcome per"):
        outcome_ranges([0.1], [])


def test_figures_draw_and_report_has_the_table(result, tmp_path):
    for build in result.figures.values():
        figure = build()
        figure.savefig(io.BytesIO(), format="png", dpi=20)  # low resolution: checks that everything draws
        assert figure.axes and all(ax.get_title() or not ax.axison for ax in figure.axes)
    assert set(result.figures) == {"trajectories", "kl_vs_step", "eta_vs_eta_max", "high_eta_sweep", "pgd_trajectories"}
    paths = write_result(dataclasses.replace(result, figures={}), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert {"report.md", "results.json"} <= set(paths)
    assert "## Paper vs ours" in report and "2.302585" in report
