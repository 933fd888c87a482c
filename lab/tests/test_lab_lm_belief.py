"""`safestep reproduce lm-belief --quick`: ghost vs belief (every rule) vs their minimum on text."""
from __future__ import annotations

import pytest

from safestep.geometry.simplex import RULES
from safestep_lab.experiments import RunOptions, load
from safestep_lab.experiments.lm_belief import QUICK, bounds
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def quick():
    return load("lm-belief").run(RunOptions(quick=True))


def _run(result, name):
    return next(r for r in result.metrics["runs"] if r["bound_name"] == name)


def test_every_rule_is_compared():
    assert set(QUICK.rules) == set(RULES)
    assert bounds(("a", "b")) == ["ghost", "belief:a", "ghost+belief:a", "belief:b", "ghost+belief:b"]


def test_the_minimum_is_never_above_the_ghost_bound_on_the_shared_first_step(quick):
    ghost = _run(quick, "ghost")["rho"][0]
    for rule in QUICK.rules:
        run = _run(quick, f"ghost+belief:{rule}")
        # step 0: same initialisation, batch and AdamW direction, so ρ = min(ρ_ghost, ρ_belief) ≤ ρ_ghost
        assert run["rho"][0] <= ghost * (1 + 1e-9)
        first = run["bound"][0] if "bound" in run else next(iter(run["binding_counts"]))
        assert first == ("ghost" if run["rho"][0] == pytest.approx(ghost, rel=1e-9) else "belief")
        assert set(run["binding_counts"]) <= {"ghost", "belief"}
        assert sum(run["binding_counts"].values()) == QUICK.steps


def test_the_paper_rule_binds_and_shrinks_the_steps(quick):
    summary = quick.metrics["summary"]["cells"]["ghost+belief:paper"]
    assert summary["binding_share"].get("belief", 0) > 0.5
    assert summary["rho_step30_median"] < summary["rho_step0_median"]  # the issue: 0.44 → 0.021


def test_plain_adamw_runs_beside_the_bounds_and_the_issue_18_claim_reports_it(quick):
    plain = _run(quick, "plain")
    assert "rho" not in plain and "binding_counts" not in plain  # unguarded
    claim = quick.claims[-1]
    assert claim.claim.startswith("issue 18") and "plain AdamW" in claim.ours
    cells = quick.metrics["summary"]["cells"]
    assert len(cells["plain"][f"val_at_{quick.metrics['summary']['checkpoint']}_per_seed"]) == len(QUICK.seeds)


def test_claims_and_files(quick, tmp_path):
    assert len(quick.claims) == 2 + len(QUICK.rules)
    paths = write_result(quick, tmp_path, quick=True)
    assert set(paths) == {"lm_belief.png", "results.json", "report.md"}
    assert "probe_size=16" in (tmp_path / "report.md").read_text()
