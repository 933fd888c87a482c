"""`safestep reproduce spike --quick`: the qualitative Fig. 6 claims we measured, and the written report."""
from __future__ import annotations

import json

import pytest

from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments.spike import MODES, QUICK, SpikeConfig, run_one
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def quick():
    calls = []
    result = load("spike").run(RunOptions(quick=True, progress=lambda done, total, label: calls.append((done, total))))
    return result, calls


def _runs(result, lr, mode):
    return [r for r in result.metrics["runs"] if r["base_lr"] == lr and r["mode"] == mode]


def test_quick_run_covers_the_grid_and_reports_progress(quick):
    result, calls = quick
    expected = len(QUICK.base_lrs) * len(MODES) * QUICK.seeds
    assert len(result.metrics["runs"]) == expected and calls[-1] == (expected, expected)
    assert "spike" in REGISTRY and result.seeds == list(range(QUICK.seeds))


def test_safestep_survives_the_held_spike_and_plain_adam_collapses_at_1e_2(quick):
    result, _ = quick
    for lr in QUICK.base_lrs:
        guarded = _runs(result, lr, "safestep")[0]
        assert guarded["final_accuracy"] >= 0.85 and not guarded["diverged"]
    plain = _runs(result, 1e-2, "plain")[0]
    assert plain["final_accuracy"] < 0.2  # chance is 0.1; we measured ≈ 0.10
    assert plain["r"][QUICK.spike_step] > 30  # the first spiked plain step is far outside the radius (measured ≈ 270)


def test_safestep_applied_steps_never_exceed_the_radius_and_plain_steps_scale_with_the_lr(quick):
    result, _ = quick
    for lr in QUICK.base_lrs:
        guarded = _runs(result, lr, "safestep")[0]
        for applied, rho in zip(guarded["applied_tau"], guarded["rho"]):
            assert applied <= rho * (1 + 1e-6)
        plain = _runs(result, lr, "plain")[0]
        s = QUICK.spike_step
        # Adam's step length is proportional to the LR (same moments): τ_spike / τ_before ≈ 1000 at the spike
        assert plain["tau"][s] / plain["tau"][s - 1] == pytest.approx(QUICK.factor, rel=0.25)


def test_at_small_base_lr_both_modes_learn_alike(quick):
    result, _ = quick
    plain, guarded = _runs(result, 1e-4, "plain")[0], _runs(result, 1e-4, "safestep")[0]
    assert plain["r"][: QUICK.spike_step] == pytest.approx(guarded["r"][: QUICK.spike_step], rel=1e-4)  # identical
    assert abs(plain["final_accuracy"] - guarded["final_accuracy"]) < 0.08


def test_report_files_are_written(quick, tmp_path):
    result, _ = quick
    paths = write_result(result, tmp_path)
    assert (tmp_path / "spike.png").stat().st_size > 10_000
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["base_lrs"] == list(QUICK.base_lrs) and len(payload["claims"]) == len(result.claims)
    assert "| claim | paper | ours | verdict |" in (tmp_path / "report.md").read_text()
    assert set(paths) == {"spike.png", "results.json", "report.md"}
    assert any("survives" in c.claim and c.verdict == "holds" for c in result.claims)


def test_run_one_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        run_one(1e-3, "clip", 0, SpikeConfig(base_lrs=(1e-3,), seeds=1, steps=2))


def test_recorded_radius_matches_an_independent_finite_difference_radius():
    """ρ_a the monitor records for plain Adam's first full-batch step = π/max spread of FD slopes (float64)."""
    import torch

    from _lab_reference import fd_radius, first_adam_direction
    from safestep_lab.data import load_digits_split
    from safestep_lab.models import build_model

    config = SpikeConfig(base_lrs=(1e-3,), seeds=1, steps=1, spike_step=0, batch_size=1438, eval_every=1)
    run = run_one(1e-3, "plain", 0, config)
    data = load_digits_split(test_fraction=0.2, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp")
    direction = first_adam_direction(model, data.x_train, data.y_train)
    assert run["rho"][0] == pytest.approx(fd_radius(model, direction, data.x_train), rel=1e-3)


def test_quick_claims_point_the_measured_way(quick):
    result, _ = quick
    claims = {c.claim: c for c in result.claims}
    assert claims["the controller survives every spike"].verdict == "holds"
    # at η0 = 1e-4 plain Adam steps past the radius for most of the held spike and still learns
    beyond = claims["a step beyond the radius (r ≥ 1) collapses training (the premise of Fig. 6)"]
    assert beyond.verdict == "differs"
    plain = result.metrics["summary"]["0.0001/plain"]
    assert plain["post_spike_share_r_above_1_median"] > 0.5 and plain["final_accuracy_median"] > 0.85
