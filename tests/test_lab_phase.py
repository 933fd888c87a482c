"""`safestep reproduce phase --quick`: one descent step of r·ρ_a on converged digits classifiers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from safestep.lab.experiments import RunOptions, load
from safestep.lab.report import write_result


@pytest.fixture(scope="module")
def result():
    return load("phase").run(RunOptions(quick=True))


def test_every_architecture_keeps_its_accuracy_for_r_up_to_one(result):
    r = np.asarray(result.metrics["r"])
    for label, arch in result.metrics["architectures"].items():
        for run in arch["runs"]:
            assert run["test_accuracy"] > 0.85, label  # trained
            assert min(np.asarray(run["accuracy_retained"])[r <= 1.0]) >= 0.95, label


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
