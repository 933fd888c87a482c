"""`safestep reproduce phase --quick`: one descent step of r·ρ_a on converged digits classifiers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from safestep_lab.experiments import RunOptions, load
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def result():
    return load("phase").run(RunOptions(quick=True))


def test_every_architecture_keeps_its_accuracy_for_r_below_one(result):
    r = np.asarray(result.metrics["r"])
    for label, arch in result.metrics["architectures"].items():
        for run in arch["runs"]:
            assert run["test_accuracy"] > 0.85, label  # trained
            assert min(np.asarray(run["accuracy_retained"])[r < 1.0]) >= 0.95, label


def test_every_architecture_collapses_beyond_r_one(result):
    for label, arch in result.metrics["architectures"].items():
        for run in arch["runs"]:
            assert 1.0 < run["onset_accuracy_90"] < 20.0, label
            assert 1.0 < run["onset_loss_2"] < 20.0, label
            assert run["loss_ratio"][-1] > 10.0, label  # r = 100 blows the loss up


def test_report_files_and_verdicts(result, tmp_path):
    paths = write_result(result, tmp_path)
    assert {"results.json", "report.md", "phase_transition.png"} <= set(paths)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["direction"] == "descent"
    assert result.claims[0].verdict == "holds"


def test_recorded_radius_matches_an_independent_finite_difference_radius(result):
    """Retrain the quick Linear unit as measure() does; its ρ_a = π/max spread of float64 FD slopes along −∇L."""
    import torch

    from _lab_reference import fd_radius, gradient
    from safestep_lab.data import load_digits_split
    from safestep_lab.experiments.phase import QUICK
    from safestep_lab.models import build_model
    from safestep_lab.sweeps import train_to_accuracy

    data = load_digits_split(test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("linear")
    train_to_accuracy(model, data, QUICK.target_accuracy, QUICK.max_train_steps, QUICK.lr, seed=0,
                      batch_size=QUICK.batch_size, check_every=QUICK.check_every)
    g = gradient(model, data.x_train, data.y_train, train_mode=False)
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())))
    direction = {name: -v / norm for name, v in g.items()}
    recorded = result.metrics["architectures"]["Linear"]["runs"][0]["rho_a"]
    assert recorded == pytest.approx(fd_radius(model, direction, data.x_train), rel=1e-4)
