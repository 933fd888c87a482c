"""`safestep reproduce lm-binds --quick`: what binds in an LM, and ρ against an independent float64 computation."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from safestep_lab.experiments import RunOptions, load
from safestep_lab.experiments.lm_binds import QUICK, RULES
from safestep_lab.experiments.lm_common import build_model, load_text
from safestep_lab.lm import lm_loss
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def quick():
    return load("lm-binds").run(RunOptions(quick=True))


def _first_adamw_direction(model, inputs, labels, lr, weight_decay, eps=1e-8):
    """AdamW's first step written out: m̂ = g, v̂ = g², Δθ = −lr·wd·θ − lr·g/(|g| + ε); returned as a unit vector."""
    twin = copy.deepcopy(model)
    loss = lm_loss(twin(inputs), labels)
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    step = {name: -lr * weight_decay * p.detach().double() - lr * g.double() / (g.double().abs() + eps)
            for (name, p), g in zip(twin.named_parameters(), grads)}
    norm = math.sqrt(sum(float(v.square().sum()) for v in step.values()))
    return {name: v / norm for name, v in step.items()}


@torch.no_grad()
def _fd_radius(model, direction, inputs, h=1e-5):
    """π / max over positions of the spread of (z(θ + h v) − z(θ − h v))/2h, the model in float64."""
    twin = copy.deepcopy(model).double().eval()
    params = dict(twin.named_parameters())
    theta = {name: p.clone() for name, p in params.items()}

    def logits(t):
        for name, p in params.items():
            p.copy_(theta[name] + t * direction[name])
        return twin(inputs)

    slopes = (logits(h) - logits(-h)) / (2 * h)
    return math.pi / float((slopes.amax(-1) - slopes.amin(-1)).max())


def test_rho_of_the_first_step_matches_an_independent_float64_finite_difference(quick):
    setup = QUICK.setup
    seed = QUICK.seeds[0]
    model = build_model(setup, seed)
    inputs, labels = load_text(setup.tokenizer).sampler(setup.batch_size, setup.seq_len, seed=seed).batch(0)
    direction = _first_adamw_direction(model, inputs, labels, QUICK.lr, setup.weight_decay)
    expected = _fd_radius(model, direction, inputs)
    row = quick.metrics["runs"][0]["rows"][0]
    assert row["step"] == 0
    assert row["rho_full"] == pytest.approx(expected, rel=1e-3)
    assert row["rho_guard"] == pytest.approx(expected, rel=1e-3)
    assert quick.metrics["runs"][0]["series"]["rho"][0] == pytest.approx(expected, rel=1e-3)


def test_subset_radii_are_never_below_the_full_batch_radius(quick):
    rows = quick.metrics["runs"][0]["rows"]
    assert len(rows) == QUICK.steps // QUICK.every
    for row in rows:
        assert set(row["ratios"]) == set(RULES)
        assert all(ratio >= 1.0 for ratio in row["ratios"].values())
        assert 0 <= row["position"] < QUICK.setup.seq_len and row["rho_full"] > 0


def test_summary_and_claims(quick, tmp_path):
    summary = quick.metrics["summary"]
    assert sum(summary["position_histogram"]) == summary["analysed_steps"]
    assert summary["rho_guard_vs_direct_max_rel_diff"] < 1e-4
    claim = quick.claims[0]
    assert claim.claim.startswith("SafeStep's ρ is the minimum") and claim.verdict == "holds"
    paths = write_result(quick, tmp_path, quick=True)
    assert set(paths) == {"lm_binds.png", "results.json", "report.md"}
    assert json.loads((tmp_path / "results.json").read_text())["name"] == "lm-binds"
    assert "probe_size=None" in (tmp_path / "report.md").read_text()
