"""The frontier benchmark's one pure helper: ρ(config)/ρ* summarized over probed steps (hand-computed values)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

# in the lab's tests: the benchmarks' workloads come from the lab (the core's tests never name it)


@pytest.fixture(scope="module")
def frontier():
    benchmarks = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        yield importlib.import_module("probe_frontier")
    finally:
        sys.path.remove(benchmarks)


def test_ratio_summary_median_worst_least(frontier) -> None:
    # ratios 2/4 = 0.5, 3/2 = 1.5, 1/1 = 1.0, 6/3 = 2.0: median (1.0 + 1.5)/2 = 1.25, worst 2.0, least 0.5
    summary = frontier.ratio_summary([2.0, 3.0, 1.0, 6.0], [4.0, 2.0, 1.0, 3.0])
    assert summary == {"median": 1.25, "worst": 2.0, "least": 0.5}


def test_ratio_summary_needs_one_reference_per_step(frontier) -> None:
    with pytest.raises(ValueError):
        frontier.ratio_summary([1.0, 2.0], [1.0])


def test_configs_start_with_the_reference(frontier) -> None:
    configs = frontier.configs()
    assert configs[0] == ("exact", None, "jvp")
    assert len(configs) == 1 + 2 * 3 * 2  # exact full JVP, then {ghost, weighted} × {1/8, 1/4, full} × {jvp, reuse}
