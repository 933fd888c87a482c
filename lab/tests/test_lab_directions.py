"""`safestep reproduce directions --quick`: descent vs random directions and ρ_a vs the Hessian step 2/κ."""
from __future__ import annotations

import numpy as np
import pytest

from safestep_lab.experiments import RunOptions, load
from safestep_lab.experiments.directions import STAGES
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def result():
    return load("directions").run(RunOptions(quick=True))


def test_stages_reach_their_accuracy_targets(result):
    for stage, target in STAGES.items():
        assert all(run["test_accuracy"] >= target for run in result.metrics["stages"][stage])


def test_hessian_step_exceeds_rho_a_and_the_gap_grows(result):
    stages = result.metrics["stages"]
    for runs in stages.values():
        for d in (d for run in runs for d in run["random"]):
            if d["kappa"] > 0:
                assert 2.0 / d["kappa"] > d["rho_a"]
    summary = result.metrics["summary"]
    assert summary["late"]["hessian_ratio_random"]["median"] > 5 * summary["early"]["hessian_ratio_random"]["median"]
    ratio_claim = next(c for c in result.claims if c.claim.startswith("Hessian step overestimates"))
    assert ratio_claim.verdict in ("holds", "partly") and "per-seed range" in ratio_claim.ours


def test_descent_lowers_the_loss_for_small_r(result):
    r = np.asarray(result.metrics["r"])
    small = int(np.argmin(np.abs(np.log(r / 0.1))))
    for runs in result.metrics["stages"].values():
        for run in runs:
            assert run["gradient"]["loss_ratio"][small] < 1.0
            assert run["gradient"]["flip_fraction"][small] < 0.1


def test_report_files(result, tmp_path):
    paths = write_result(result, tmp_path)
    assert {"results.json", "report.md", "directions_sweep.png", "directions_hessian.png"} <= set(paths)
    assert result.claims[0].verdict == "holds"


def test_measured_radius_and_ratio_match_independent_finite_differences():
    """ρ_a of measure_direction = π/max spread of float64 FD slopes; its ratio uses that ρ_a and κ = vᵀHv."""
    import torch

    from _lab_reference import fd_radius
    from safestep_lab.data import load_digits_split
    from safestep_lab.experiments.directions import measure_direction
    from safestep_lab.models import build_model
    from safestep_lab.sweeps import random_direction

    data = load_digits_split(test_fraction=0.3, seed=42)
    x, y = data.x_train[:96], data.y_train[:96]
    torch.manual_seed(3)
    model = build_model("mlp-ln")
    direction = random_direction(model, torch.Generator().manual_seed(5))
    measured = measure_direction(model, direction, x, y, np.array([0.5, 1.0, 2.0]))
    reference = fd_radius(model, direction, x)
    assert measured["rho_a"] == pytest.approx(reference, rel=1e-4)
    if measured["kappa"] > 0:
        assert measured["hessian_ratio"] == pytest.approx(2.0 / measured["kappa"] / reference, rel=1e-4)
