"""The natural experiment: applied r of guarded and monitored runs, and the quick run's measured claims."""
from __future__ import annotations

import math

import pytest

from safestep.lab.experiments import RunOptions
from safestep.lab.experiments.natural import EXPERIMENT, QUICK, NaturalConfig, applied_r
from safestep.lab.report import write_result
from safestep.lab.training import StepRecord, TrainResult


def test_applied_r_scales_the_proposed_r_and_skips_unmeasured_steps():
    result = TrainResult(steps=[
        StepRecord(0, 0.1, 2.0, tau=4.0, rho=1.0, r=4.0, scale=0.25),  # set mode: applied τ = ρ → r = 1
        StepRecord(1, 0.1, 2.0, tau=3.0, rho=2.0, r=1.5),  # monitored plain step: r as measured
        StepRecord(2, 0.1, 2.0),  # not measured
        StepRecord(3, 0.1, 2.0, tau=math.nan, rho=math.nan, r=math.nan, scale=0.0, skipped=True),
    ])
    assert applied_r(result) == [1.0, 1.5]


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="positive"):
        NaturalConfig(targets=(0.0,))
    with pytest.raises(ValueError, match="epochs"):
        NaturalConfig(epochs=0)


@pytest.fixture(scope="module")
def quick_result():
    return EXPERIMENT.run(RunOptions(quick=True))


def test_quick_run_writes_its_report(quick_result, tmp_path):
    paths = write_result(quick_result, tmp_path)
    assert {"results.json", "report.md", "natural.png"} <= set(paths)
    assert "| claim | paper | ours | verdict |" in paths["report.md"].read_text()


def test_quick_controllers_step_exactly_r_times_rho(quick_result):
    controlled = quick_result.metrics["controlled"]
    assert set(controlled) == {f"{r:g}" for r in QUICK.targets}
    for target in QUICK.targets:
        summary = controlled[f"{target:g}"]
        assert summary["max_r_median"] == pytest.approx(target, rel=1e-6)
        assert summary["steps_r_above_1_median"] == (summary["steps"][0] if target > 1 else 0)


def test_quick_measured_claims(quick_result):
    fixed, controlled = quick_result.metrics["fixed"], quick_result.metrics["controlled"]
    # measured: a large fixed LR takes steps far beyond the radius (η = 0.1 reaches r ≈ 5, η = 0.5 blows up)
    assert fixed["0.1"]["max_r_median"] > 2.0 and fixed["0.5"]["max_r_median"] > 10.0
    # measured: r = 4 breaks training while the cautious r = 0.5 learns
    assert controlled["0.5"]["accuracy_median"] > 50.0
    assert controlled["4"]["accuracy_median"] < controlled["0.5"]["accuracy_median"] - 30.0
