"""`safestep reproduce lm-calm --quick`: the LR sweep without spikes."""
from __future__ import annotations

import pytest

from safestep_lab.experiments import RunOptions, load
from safestep_lab.experiments.lm_calm import QUICK
from safestep_lab.report import VERDICTS, write_result


@pytest.fixture(scope="module")
def quick():
    return load("lm-calm").run(RunOptions(quick=True))


def _run(result, lr, method):
    return next(r for r in result.metrics["runs"] if r["lr_value"] == lr and r["method"] == method)


def test_grid_same_start_and_capping(quick):
    assert len(quick.metrics["runs"]) == len(QUICK.lrs) * len(QUICK.methods) * len(QUICK.seeds)
    for lr in QUICK.lrs:
        starts = {_run(quick, lr, m)["val_loss"][0] for m in QUICK.methods}
        assert len(starts) == 1  # same initialisation for every method
        guarded = _run(quick, lr, "safestep")
        for tau, rho, scale in zip(guarded["tau"], guarded["rho"], guarded["scale"]):
            assert tau * scale <= rho * (1 + 1e-6)
    # a larger LR proposes longer steps, so the cap fires at least as often
    shares = [quick.metrics["summary"]["cells"][f"{lr:g}/safestep"]["share_capped"] for lr in QUICK.lrs]
    assert shares[-1] > 0


def test_claims_compare_best_lrs(quick, tmp_path):
    summary = quick.metrics["summary"]
    for method, best in summary["best"].items():
        finals = [summary["cells"][f"{lr:g}/{method}"]["final"]["median"] for lr in QUICK.lrs]
        assert best["final_median"] == min(finals)
    assert all(c.verdict in VERDICTS for c in quick.claims) and len(quick.claims) == 3
    assert quick.claims[0].claim.startswith("the best LR with SafeStep is not worse than the best without it")
    best = summary["best"]
    gap = best["safestep"]["final_median"] / best["plain"]["final_median"] - 1
    assert (quick.claims[0].verdict == "holds") == (gap <= 0.01)
    paths = write_result(quick, tmp_path, quick=True)
    assert set(paths) == {"lm_calm.png", "results.json", "report.md"}
