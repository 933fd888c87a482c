"""`safestep reproduce temperature --quick`: loss-doubling onsets in τ vs in r_T = τ/ρ_a(T)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from safestep_lab.experiments import RunOptions, load
from safestep_lab.experiments.temperature import collapse_std
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def result():
    return load("temperature").run(RunOptions(quick=True))


def test_collapse_std_is_the_std_of_log10_median_onsets():
    assert collapse_std({1.0: [10.0, 10.0], 2.0: [50.0, 100.0, 200.0]}) == pytest.approx(0.5)
    assert collapse_std({1.0: [math.inf], 2.0: [10.0], 4.0: [1000.0]}) == pytest.approx(1.0)
    assert math.isnan(collapse_std({1.0: [10.0]}))
    # raw: the medians 10 and 100 have population std 45 (the log10 spread of the same medians is 0.5)
    assert collapse_std({1.0: [10.0, 10.0], 2.0: [50.0, 100.0, 200.0]}, "raw") == pytest.approx(45.0)
    with pytest.raises(ValueError, match="definition"):
        collapse_std({1.0: [1.0]}, "variance")


def test_onsets_agree_better_in_r_T_than_in_raw_tau(result):
    stds = result.metrics["collapse_std"]["log10"]
    assert stds["r_T"] < 0.5 * stds["tau"]
    for run in result.metrics["runs"]:
        assert 0.5 < run["onset_r_T"] < 5.0, run["temperature"]
        assert run["onset_r_T"] == pytest.approx(run["onset_tau"] / run["rho_T"])


def test_radius_grows_with_temperature(result):
    rho = [s["rho_T"]["median"] for s in result.metrics["per_temperature"].values()]
    assert np.all(np.diff(rho) > 0)


def test_report_files(result, tmp_path):
    paths = write_result(result, tmp_path)
    assert {"results.json", "report.md", "temperature_fingerprint.png"} <= set(paths)
    assert "collapse std" in (tmp_path / "report.md").read_text()
    spreads = [c for c in result.claims if c.claim.startswith("Measuring steps in r_T")]
    assert [c.claim.endswith(f"({d} spread)") for c, d in zip(spreads, ("log10", "raw"))] == [True, True]
