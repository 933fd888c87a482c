"""belief-slice (belief paper Fig. 2): the slice curves against closed forms, numpy eigenvalues and numpy.roots."""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments.belief_slice import (
    K3_REFERENCE, ads_peak, closed_form_paper, matches_printed, run, slice_beliefs, slice_curves,
)
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def result():
    return run(RunOptions(quick=True))


def _np_tangent_threshold(p: np.ndarray) -> float:
    """2/θ_max with θ_max the largest eigenvalue of diag(1/p) restricted to {v : Σv = 0} (orthonormal basis)."""
    k = len(p)
    basis = np.linalg.svd(np.eye(k) - 1.0 / k)[0][:, : k - 1]  # columns span the tangent space
    return 2.0 / np.linalg.eigvalsh(basis.T @ np.diag(1.0 / p) @ basis).max()


def _np_ads_paper(t: np.ndarray, eps: float) -> np.ndarray:
    low, high = np.minimum(t, 1 - t), np.maximum(t, 1 - t)
    entropy = -(t * np.log(t) + (1 - t) * np.log(1 - t)) / math.log(2)
    return 2 * low**2 / high / (1 - np.log(np.maximum(1 - entropy, 0.0) + eps))


def test_registered():
    assert REGISTRY["belief-slice"] == "safestep_lab.experiments.belief_slice"
    assert load("belief-slice").name == "belief-slice"


def test_slice_curves_match_closed_forms_and_numpy_eigenvalues():
    t = torch.tensor([1e-3, 0.05, 0.1, 0.3, 0.45, 0.5, 0.7, 0.99], dtype=torch.float64)
    curves = slice_curves(t)
    low = torch.minimum(t, 1 - t)
    np.testing.assert_allclose(curves["max/paper"], 2 * low**2 / torch.maximum(t, 1 - t), rtol=1e-14)
    np.testing.assert_allclose(curves["max/sharp"], 2 * low, rtol=1e-14)
    np.testing.assert_allclose(curves["max/tangent"], 4 * t * (1 - t), rtol=1e-12)
    np.testing.assert_allclose(curves["max/tangent"], [_np_tangent_threshold(np.array([v, 1 - v])) for v in t.tolist()],
                               rtol=1e-10)
    interior = t != 0.5  # numpy's 1 − H/log 2 cancels at the centre; compare away from it
    np.testing.assert_allclose(curves["ads/paper"][interior], _np_ads_paper(t.numpy(), 1e-10)[interior.numpy()],
                               rtol=1e-6)
    assert float(curves["ads0/paper"][t == 0.5]) == 0.0  # B = 1 exactly: α = ∞


def test_closed_form_values_at_the_tabulated_points():
    t = torch.tensor([1e-3, 0.1, 0.3, 0.5], dtype=torch.float64)
    np.testing.assert_allclose(closed_form_paper(t), [2e-6 / 0.999, 0.02 / 0.9, 0.18 / 0.7, 1.0], rtol=1e-14)
    with pytest.raises(ValueError, match="lie in"):
        slice_beliefs(torch.tensor([1.2]))


def test_ads_peak_against_a_numpy_grid():
    t_peak, value = ads_peak()
    grid = np.linspace(0.3, 0.4999, 200_001)
    values = _np_ads_paper(grid, 0.0)
    assert t_peak == pytest.approx(grid[values.argmax()], abs=2e-5)
    assert value == pytest.approx(values.max(), rel=1e-6)
    assert t_peak == pytest.approx(0.444, abs=1e-3) and value == pytest.approx(0.124, abs=5e-4)


def test_k3_reference_table_with_numpy_roots():
    for y, (paper, sharp, tangent) in K3_REFERENCE.items():
        p = np.array(y)
        a, b, c = 3 * p.prod(), -2 * (p[0] * p[1] + p[0] * p[2] + p[1] * p[2]), 1.0
        theta_max = np.roots([a, b, c]).real.max()  # MATH_BELIEF.md §3: 3y0y1y2θ² − 2(Σ y_i y_j)θ + 1 = 0
        assert matches_printed(2 / theta_max, tangent)
        assert matches_printed(2 * p.min() ** 2 / p.max(), paper)
        assert matches_printed(2 * p.min(), sharp)


def test_matches_printed():
    assert matches_printed(0.0285714, 0.02857) and not matches_printed(0.02859, 0.02857)
    assert matches_printed(2.0408e-4, 2.04e-4) and not matches_printed(2.06e-4, 2.04e-4)
    assert matches_printed(2 / 3, 0.6667) and matches_printed(0.2, 0.2) and not matches_printed(0.26, 0.2)


def test_run_tabulated_values_and_claims(result):
    tab = result.metrics["tabulated"]
    assert tab["0.001"]["max/paper"] == pytest.approx(2.0e-6, rel=2e-3)
    assert tab["0.1"]["max/paper"] == pytest.approx(0.0222, abs=5e-5)
    assert tab["0.3"]["max/paper"] == pytest.approx(0.257, abs=5e-4)
    assert tab["0.5"]["max/paper"] == 1.0
    assert result.metrics["ads_centre"] == pytest.approx(1 / (1 - math.log(1e-10)), rel=1e-9)  # B = 1 at t = ½
    assert result.metrics["ads_centre"] == pytest.approx(0.0416, abs=5e-5)
    for row in result.metrics["k3_table"]:
        assert all(matches_printed(o, p) for o, p in zip(row["ours"], row["reference"]))
    verdicts = {c.claim: c.verdict for c in result.claims}
    assert verdicts["Both curves widen toward the center"] == "partly"
    assert sum(v == "holds" for v in verdicts.values()) == len(verdicts) - 2
    assert result.metrics["conservatism"]["tangent_over_paper_at_y1"] == pytest.approx(0.25119 / 0.0285714, rel=1e-4)
    # nothing here is a printed paper number: every paper column says it is our evaluation of a reconstruction
    numeric = [c for c in result.claims if c.verdict != "not in paper" and c.claim != "Both curves widen toward the center"]
    assert numeric and all(c.paper.startswith("[not printed") for c in numeric)


def test_figure_draws_and_report_has_the_table(result, tmp_path):
    figure = result.figures["binary_slice"]()
    figure.savefig(io.BytesIO(), format="png", dpi=20)
    assert len(figure.axes) == 2 and all(ax.get_yscale() == "log" for ax in figure.axes)
    write_result(dataclasses.replace(result, figures={}), tmp_path)
    assert "## Paper vs ours" in (tmp_path / "report.md").read_text()
