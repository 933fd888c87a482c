"""The natural experiment: applied r of guarded and monitored runs, and the quick run's measured claims."""
from __future__ import annotations

import math

import pytest

from safestep_lab.experiments import RunOptions
from safestep_lab.experiments.natural import EXPERIMENT, QUICK, NaturalConfig, applied_r, cosine_lr, train_arm
from safestep_lab.report import write_result
from safestep_lab.training import StepRecord, TrainResult
from safestep.telemetry import StepReport


def test_applied_r_scales_the_proposed_r_and_skips_unmeasured_steps():
    def report(tau, rho, scale, skipped=False):
        return StepReport(tau=tau, rho=rho, r_proposed=tau / rho, scale=scale, r_applied=0.0 if skipped else scale * tau / rho,
                          bound="ghost", method="jvp", rows_probed=4, skipped=skipped, seconds=0.0)

    result = TrainResult(steps=[
        StepRecord(0, 0.1, 2.0, report(4.0, 1.0, 0.25)),  # set mode: applied τ = ρ → r = 1
        StepRecord(1, 0.1, 2.0, report(3.0, 2.0, 1.0)),  # monitored plain step: r as measured
        StepRecord(2, 0.1, 2.0),  # not measured
        StepRecord(3, 0.1, 2.0, report(math.nan, math.nan, 0.0, skipped=True)),
    ])
    assert applied_r(result) == [1.0, 1.5]


def test_config_rejects_invalid_values():
    with pytest.raises(ValueError, match="positive"):
        NaturalConfig(targets=(0.0,))
    with pytest.raises(ValueError, match="epochs"):
        NaturalConfig(epochs=0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        NaturalConfig(epochs=2, warmup_epochs=2)
    assert [kind for kind, _ in NaturalConfig().arms()].count("warmup") == 1


def test_cosine_schedule_decays_from_the_peak_to_zero():
    schedule = cosine_lr(0.2, 100)
    assert schedule(0) == 0.2 and schedule(50) == pytest.approx(0.1) and schedule(100) == pytest.approx(0.0, abs=1e-12)


def test_first_step_radius_matches_an_independent_finite_difference_radius():
    """ρ_a of the first monitored SGD step (full batch) = π/max spread of float64 FD slopes along −(g + wd·θ)."""
    import torch

    from _lab_reference import fd_radius, first_sgd_direction
    from safestep_lab.data import load_digits_split
    from safestep_lab.models import build_model

    config = NaturalConfig(epochs=1, batch_size=1438, seeds=(0,), lrs=(0.1,), targets=(1.0,), models=("cnn",),
                           cap_lrs=(), warmup_epochs=0, cosine_lrs=())
    run = train_arm("cnn", "fixed", 0.1, 0, config)
    data = load_digits_split()
    torch.manual_seed(0)
    model = build_model("cnn")
    direction = first_sgd_direction(model, data.x_train, data.y_train, config.weight_decay)
    assert run["rho_first_step"] == pytest.approx(fd_radius(model, direction, data.x_train), rel=1e-3)
    assert run["weight_norm"] == pytest.approx(
        float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm()))


@pytest.fixture(scope="module")
def quick_result():
    return EXPERIMENT.run(RunOptions(quick=True))


def test_quick_run_writes_its_report(quick_result, tmp_path):
    paths = write_result(quick_result, tmp_path)
    assert {"results.json", "report.md", "natural.png"} <= set(paths)
    assert "| claim | paper | ours | verdict |" in paths["report.md"].read_text()


def test_quick_controllers_step_exactly_r_times_rho(quick_result):
    controlled = quick_result.metrics["cnn"]["set"]
    assert set(controlled) == {f"{r:g}" for r in QUICK.targets}
    for target in QUICK.targets:
        summary = controlled[f"{target:g}"]
        assert summary["max_r_median"] == pytest.approx(target, rel=1e-6)
        assert summary["steps_r_above_1_median"] == (summary["steps"][0] if target > 1 else 0)


def test_quick_measured_claims(quick_result):
    fixed, controlled = quick_result.metrics["cnn"]["fixed"], quick_result.metrics["cnn"]["set"]
    # measured: a large fixed LR takes steps far beyond the radius (η = 0.1 reaches r ≈ 5, η = 0.5 blows up)
    assert fixed["0.1"]["max_r_median"] > 2.0 and fixed["0.5"]["max_r_median"] > 10.0
    # measured: r = 4 breaks training while the cautious r = 0.5 learns
    assert controlled["0.5"]["accuracy_median"] > 50.0
    assert controlled["4"]["accuracy_median"] < controlled["0.5"]["accuracy_median"] - 30.0
