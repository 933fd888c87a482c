"""calibration (new): ρ*/ρ_a against closed forms (K = 2) and numpy.roots (K = 3), the probing plumbing, and the
quick run's measured claims."""
from __future__ import annotations

import cmath
import dataclasses
import io
import math

import numpy as np
import pytest
import torch

from safestep_lab.data import load_digits_split
from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments.calibration import ARCHITECTURES, ProbingOptimizer, phase_of, radius_ratios, run
from safestep_lab.models import Linear
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def result():
    return run(RunOptions(quick=True))


def test_registered():
    assert REGISTRY["calibration"] == "safestep_lab.experiments.calibration"
    assert load("calibration").name == "calibration"


def test_binary_ratios_match_the_closed_form():
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.5], [5.0, 0.0]], dtype=torch.float64)
    slopes = torch.tensor([[0.3, -0.7], [1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    margin = logits[:, 0] - logits[:, 1]
    gap = (slopes[:, 0] - slopes[:, 1]).abs()
    ratios, batch = radius_ratios(logits, slopes)
    np.testing.assert_allclose(ratios, torch.sqrt(margin**2 + math.pi**2) / math.pi, rtol=1e-7)
    exact = torch.sqrt(margin**2 + math.pi**2) / gap  # ρ* = √(δ² + π²)/|Δ|
    assert batch == pytest.approx(float(exact.min() / (math.pi / gap.max())), rel=1e-7)


def test_three_class_ratio_matches_numpy_roots():
    # integer slopes 0, 1, 2: F(t) = w0 + w1 e^t + w2 e^{2t} is a quadratic in u = e^t; zeros t = log u + 2πik
    logits = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    w = torch.softmax(logits, dim=-1)[0].numpy()
    zeros = [cmath.log(u) + 2j * math.pi * k for u in np.roots([w[2], w[1], w[0]]) for k in range(-3, 4)]
    rho_star = min(abs(z) for z in zeros)
    ratios, batch = radius_ratios(logits, torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64))
    assert float(ratios[0]) == pytest.approx(rho_star / (math.pi / 2), rel=1e-7)
    assert batch == pytest.approx(float(ratios[0]), rel=1e-12)  # one row: both ratios coincide


def test_radius_ratios_rejects_a_step_that_moves_nothing():
    with pytest.raises(ValueError, match="Δ_a = 0"):
        radius_ratios(torch.zeros(3, 4), torch.ones(3, 4))


def test_probing_optimizer_measures_the_step_it_takes_without_changing_it():
    data = load_digits_split()
    x, y = data.x_train[:32], data.y_train[:32]
    torch.manual_seed(0)
    model, twin = Linear(), Linear()
    twin.load_state_dict(model.state_dict())
    probed = ProbingOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, every=2)
    plain = torch.optim.Adam(twin.parameters(), lr=0.05)
    expected = []
    for _ in range(5):
        theta0 = [p.detach().clone() for p in model.parameters()]
        with torch.no_grad():
            z0 = model(x).double()
        for net, opt in ((model, probed), (twin, plain)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        tau = math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(model.parameters(), theta0)))
        with torch.no_grad():
            slopes = (model(x).double() - z0) / tau  # the logits of a linear model are linear along the step
        expected.append((tau, z0, slopes))
    probed.close()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    assert [r.step for r in probed.records] == [0, 2, 4]
    for record, (tau, z0, slopes) in zip(probed.records, [expected[0], expected[2], expected[4]]):
        assert record.tau == pytest.approx(tau, rel=1e-5)
        reference, batch = radius_ratios(z0, slopes)
        np.testing.assert_allclose(record.ratios, reference, rtol=1e-3)
        assert record.batch_ratio == pytest.approx(batch, rel=1e-3)


def test_phase_of():
    assert [phase_of(s, 90) for s in (0, 29, 30, 59, 60, 89)] == ["early", "early", "mid", "mid", "late", "late"]


def test_quick_run_lower_bound_holds_and_exact_radius_is_larger(result):
    summary = result.metrics["summary"]
    assert set(summary) == set(ARCHITECTURES)
    for arch, s in summary.items():
        assert s["all"]["per_sample"]["min"] >= 1 - 1e-6, arch  # ρ* ≥ π/Δ_a for every probed sample
        assert s["all"]["batch"]["min"] >= 1 - 1e-6, arch
        assert s["all"]["per_sample"]["q50"] > 1.2, arch  # measured 1.7–2.0 in the quick run
        assert s["all"]["batch"]["q50"] > 1.1, arch  # measured 1.3–1.9
        assert {"early", "mid", "late"} <= set(s)
        assert len([p for p in result.metrics["per_probe"][arch]]) == 9  # steps 0, 10, …, 80
    assert result.claims[-1].verdict == "holds"
    assert all(c.verdict == "not in paper" for c in result.claims[:-1])
    assert result.seeds == [0]


def test_figures_draw_and_report_has_the_table(result, tmp_path):
    for build in result.figures.values():
        figure = build()
        figure.savefig(io.BytesIO(), format="png", dpi=20)
        assert figure.axes
    write_result(dataclasses.replace(result, figures={}), tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Paper vs ours" in report and "not in paper (listed as future work)" in report
