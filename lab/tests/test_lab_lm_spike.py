"""`safestep reproduce lm-spike --quick`: the ×1000 spike on the byte-level GPT and the written report."""
from __future__ import annotations

import json
import math

import pytest

from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments.lm_common import Method, Schedule
from safestep_lab.experiments.lm_spike import QUICK, methods
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def quick():
    calls = []
    result = load("lm-spike").run(RunOptions(quick=True, progress=lambda done, total, label: calls.append((done, total))))
    return result, calls


def _run(result, factor, method):
    return next(r for r in result.metrics["runs"] if r["factor"] == factor and r["method"] == method)


def test_quick_run_covers_the_grid_and_reports_progress(quick):
    result, calls = quick
    assert "lm-spike" in REGISTRY
    assert len(result.metrics["runs"]) == len(QUICK.units()) * len(QUICK.seeds)
    assert calls[-1][0] == calls[-1][1]


def test_every_safestep_method_passes_its_probe_explicitly():
    for method in methods(QUICK).values():
        if method.kind == "safestep":
            assert {"probe_size", "method"} <= set(dict(method.options))
    with pytest.raises(ValueError, match="probe_size"):
        Method("x", "safestep", (("method", "jvp"),))


def test_the_spike_schedule_is_held_for_30_steps():
    schedule = QUICK.schedule(1000.0)
    lrs = [schedule(t) for t in range(QUICK.steps)]
    assert lrs.count(3.0) == 30 and lrs[QUICK.spike_start - 1] == pytest.approx(3e-3)
    assert lrs[QUICK.spike_start] == pytest.approx(3.0) and lrs[QUICK.spike_start + 30] == pytest.approx(3e-3)
    assert Schedule(1e-3, warmup=10, cosine=True, total=110)(9) == pytest.approx(1e-3)
    assert Schedule(1e-3, warmup=10, cosine=True, total=110, min_ratio=0.1)(110) == pytest.approx(1e-4)


def test_safestep_survives_the_spike_that_wrecks_plain_adamw_and_clipping(quick):
    result, _ = quick
    initial = result.metrics["summary"]["initial_val_loss"]
    plain, clip, guarded = (_run(result, 1000.0, m)["final_val_loss"] for m in ("plain", "clip", "safestep"))
    assert plain > 10 * initial and clip > 2 * initial  # measured ≈ 840 and ≈ 370 (untrained: 5.5)
    assert guarded < initial and guarded < plain / 100 and guarded < clip / 10
    claims = {c.claim.split(":")[0]: c for c in result.claims}
    assert claims["×1000 held 30 steps wrecks plain AdamW"].verdict == "holds"


def test_applied_safestep_steps_never_exceed_the_radius_and_the_spike_is_capped(quick):
    result, _ = quick
    run = _run(result, 1000.0, "safestep")
    assert len(run["rho"]) == QUICK.steps
    for tau, rho, scale in zip(run["tau"], run["rho"], run["scale"]):
        assert tau * scale <= rho * (1 + 1e-6)
    spiked = range(QUICK.spike_start, QUICK.spike_start + QUICK.spike_steps)
    assert all(run["scale"][t] < 1e-2 for t in spiked)  # AdamW proposes τ ≈ 1000× its usual length
    assert run["binding_counts"] == {"ghost": QUICK.steps}


def test_baselines_did_something_under_the_spike(quick):
    result, _ = quick
    skip = _run(result, 1000.0, "skip")
    assert skip["steps_skipped"] == len(skip["acted_at"]) > 0
    assert min(skip["acted_at"]) > QUICK.spike_start  # the loss rises only after the first spiked step
    assert _run(result, 1000.0, "zclip")["steps_clipped"] > 0


def test_report_files_are_written(quick, tmp_path):
    result, _ = quick
    paths = write_result(result, tmp_path, quick=True)
    assert set(paths) == {"lm_spike.png", "lm_spike_radius.png", "results.json", "report.md"}
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["name"] == "lm-spike" and payload["quick"] is True
    report = (tmp_path / "report.md").read_text()
    assert "probe_size=16" in report and "2,100" in report and "| claim | paper | ours | verdict |" in report
    assert all(math.isfinite(r["final_val_loss"]) for r in result.metrics["runs"])
