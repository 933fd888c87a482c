"""`safestep reproduce lm-schedule --quick`: set mode against warm-up + cosine and a constant LR."""
from __future__ import annotations

import math

import pytest

from safestep_lab.experiments import RunOptions, load
from safestep_lab.experiments.lm_schedule import QUICK, arms, schedule_for
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def quick():
    return load("lm-schedule").run(RunOptions(quick=True))


def test_set_mode_steps_are_exactly_r_rho_long(quick):
    for run in quick.metrics["runs"]:
        if run["kind"] != "set":
            assert "rho" not in run
            continue
        assert len(run["rho"]) == QUICK.steps
        for tau, rho, scale in zip(run["tau"], run["rho"], run["scale"]):
            # exact up to the rounding margin the apply step keeps (u·‖θ0‖, at most 0.1 % of the step)
            target = run["value"] * rho
            assert math.isfinite(rho) and target * (1 - 1e-3) <= tau * scale <= target * (1 + 1e-9)


def test_warmup_and_cosine_lrs_are_what_the_protocol_says():
    peak = 3e-3
    lrs = [schedule_for("cosine", peak, QUICK)(t) for t in range(QUICK.steps)]
    assert lrs[0] == pytest.approx(peak / QUICK.warmup) and lrs[QUICK.warmup - 1] == pytest.approx(peak)
    assert max(lrs) == pytest.approx(peak) and peak * QUICK.min_ratio < lrs[-1] < 0.15 * peak
    assert all(a >= b for a, b in zip(lrs[QUICK.warmup:], lrs[QUICK.warmup + 1:]))  # decays monotonically
    assert {schedule_for("constant", peak, QUICK)(t) for t in range(QUICK.steps)} == {peak}


def test_summary_claims_and_files(quick, tmp_path):
    best = quick.metrics["summary"]["best"]
    assert set(best) == {"set", "cosine", "constant"}
    assert len(quick.metrics["runs"]) == len(arms(QUICK)) * len(QUICK.seeds)
    assert len(quick.claims) == 2
    paths = write_result(quick, tmp_path, quick=True)
    assert "mode='set'" in (tmp_path / "report.md").read_text() and "lm_schedule.png" in paths
