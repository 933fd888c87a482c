"""The belief maps against the tests' independent references (moved from tests/ with the maps, issue 21).

The references live in the library's tests and are imported from there: tests/test_geometry_support.py's brute-force
kit (a bisection projection and the exact maps that its Lipschitz measurements differentiate) and
tests/test_belief_safety.py's numpy projection, mirror step and energy. Checking the lab's maps against them keeps
both the maps and the kit honest.
"""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from safestep.geometry import max_step
from safestep_lab.simplex_dynamics import mirror_step, projected_step

# torch.func's first use imports a module that warns about torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
f64 = torch.float64


def _library_test_module(name: str) -> ModuleType:
    tests = str(Path(__file__).resolve().parents[2] / "tests")
    sys.path.insert(0, tests)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(tests)


@pytest.fixture(scope="module")
def kit() -> ModuleType:
    return _library_test_module("test_geometry_support")


@pytest.fixture(scope="module")
def safety() -> ModuleType:
    return _library_test_module("test_belief_safety")


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


# ------------------------------------------------------------------ the global two-point theorem

@pytest.mark.parametrize("k", [3, 10, 1000, 50_000])
def test_projected_step_contraction_identity_for_one_hot_targets(k):
    """‖F p1 − F p2‖² ≤ ‖δ‖² − α(2 − α(1 − 1/K))δ_c², α = η/(p1_c·p2_c), for η ≤ min of the rule at p1 and p2."""
    g = torch.Generator().manual_seed(k)
    n = 64 if k <= 1000 else 8
    scale = torch.tensor([0.01, 1.0, 3.0, 6.0], dtype=f64).repeat(n // 4)[:, None]
    p1 = torch.softmax(torch.randn(n, k, generator=g, dtype=f64) * scale, dim=-1)
    p2 = torch.softmax(torch.randn(n, k, generator=g, dtype=f64) * scale.flip(0), dim=-1)
    label = torch.randint(0, k, (n,), generator=g)
    p1[torch.arange(n), label] += 0.2  # keep p_c away from the 1e-12 gradient floor of the library's maps
    p2[torch.arange(n), label] += torch.rand(n, generator=g, dtype=f64)
    p1, p2 = p1 / p1.sum(-1, keepdim=True), p2 / p2.sum(-1, keepdim=True)
    y = torch.nn.functional.one_hot(label, k).to(f64)
    rule = torch.minimum(max_step(p1, "support", target=y), max_step(p2, "support", target=y))
    delta = p1 - p2
    c1, c2 = p1.gather(-1, label[:, None])[:, 0], p2.gather(-1, label[:, None])[:, 0]
    for fraction in (0.3, 1.0):
        eta = fraction * rule
        out = (projected_step(p1, y, eta) - projected_step(p2, y, eta)).norm(dim=-1) ** 2
        alpha = eta / (c1 * c2)
        gain = alpha * (2 - alpha * (1 - 1 / k)) * delta.gather(-1, label[:, None])[:, 0] ** 2
        assert (out <= delta.norm(dim=-1) ** 2 - gain + 1e-14).all()
        assert (gain >= 0).all()


def test_projected_step_expands_just_above_the_rule_without_clamping():
    """Tightness: if the projection keeps every coordinate, η just above 2p_c²K/(K−1) expands δ along P_T e_c."""
    k = 5
    p = torch.tensor([0.3, 0.2, 0.2, 0.15, 0.15], dtype=f64)
    y = torch.nn.functional.one_hot(torch.tensor(1), k).to(f64)
    rule = max_step(p, "support", target=y).item()
    direction = torch.full((k,), -1.0 / k, dtype=f64)
    direction[1] += 1.0
    h = 1e-7
    ratio = lambda eta: ((projected_step(p + h * direction, y, eta) - projected_step(p - h * direction, y, eta)).norm()
                         / (2 * h * direction.norm())).item()
    assert ratio(0.999 * rule) <= 1.0 + 1e-6
    assert ratio(1.02 * rule) > 1.03


# ------------------------------------------------------------------ mirror step: the label log-odds map

def test_mirror_step_label_log_odds_contract_and_the_rest_is_unchanged():
    """Mirror step, one-hot c: ℓ = log(p_c/(1 − p_c)) maps to ℓ + η/p_c, p_{−c}/(1 − p_c) is unchanged; |Δℓ'| ≤ |Δℓ|."""
    g = torch.Generator().manual_seed(4)
    k, n = 50, 200
    p1 = torch.softmax(torch.randn(n, k, generator=g, dtype=f64) * 3, dim=-1)
    p2 = torch.softmax(torch.log(p1) + 0.05 * torch.randn(n, k, generator=g, dtype=f64), dim=-1)
    label = torch.randint(0, k, (n,), generator=g)
    y = torch.nn.functional.one_hot(label, k).to(f64)
    eta = torch.minimum(max_step(p1, "support", target=y), max_step(p2, "support", target=y))
    log_odds = lambda q: (q.gather(-1, label[:, None]) / (1 - q.gather(-1, label[:, None])))[:, 0].log()
    rest = lambda q: torch.where(y > 0, 0.0, q) / (1 - q.gather(-1, label[:, None]))
    m1, m2 = mirror_step(p1, y, eta), mirror_step(p2, y, eta)
    assert torch.allclose(log_odds(m1), log_odds(p1) + eta / p1.gather(-1, label[:, None])[:, 0], rtol=1e-10)
    assert torch.allclose(rest(m1), rest(p1), rtol=1e-9, atol=1e-300)
    assert ((log_odds(m1) - log_odds(m2)).abs() <= (log_odds(p1) - log_odds(p2)).abs() * (1 + 1e-9)).all()


# ------------------------------------------------------------------ the brute-force kit

def test_brute_force_kit_matches_the_lab_maps(kit):
    for description, p, y in kit.cases(40, seed=5, labels=("median",)):
        eta = 3 * max_step(p, "support", target=y).item()
        support = kit.projection_support(p + eta * y / p)
        exact = kit.exact_projected(support)(p, y, eta)
        assert torch.allclose(exact, projected_step(p, y, eta), atol=1e-15), description
        assert torch.allclose(kit.exact_mirror(p, y, eta), mirror_step(p, y, eta), atol=1e-15), description

# ------------------------------------------------------------------ the issue's counterexamples (test_belief_safety)

def test_projected_step_matches_the_bisection_reference_on_the_issue_pair(safety):
    p1, y = np.array([0.5, 0.3, 0.2]), np.array([1.0, 0, 0])
    for eta in (0.01, 0.05, 0.15):
        np.testing.assert_allclose(projected_step(_t(p1), _t(y), eta).numpy(), safety.projected(p1, y, eta), atol=1e-12)


def test_soft_target_projected_step_at_the_rule_lands_on_a_vertex_and_the_mirror_step_does_not(safety):
    """The issue's belief: smoothing 0.1 on label 0; at η_support the projected step lands on e₀ (E = +∞)."""
    p, y = np.array([0.406, 0.301, 0.293]), np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    eta = max_step(_t(p), "support", target=_t(y)).item()
    assert torch.equal(projected_step(_t(p), _t(y), eta), _t([1.0, 0.0, 0.0]))
    assert safety.energy(projected_step(_t(p), _t(y), eta).numpy(), y) == math.inf
    np.testing.assert_allclose(mirror_step(_t(p), _t(y), eta).numpy(), safety.mirror(p, y, eta), rtol=1e-12)


def test_mirror_step_keeps_soft_target_energy_finite_where_the_projected_step_does_not(safety):
    """Random K = 3 beliefs and labels, smoothing 0.1, η = η_support: projected E = ∞ in some, mirror E never rises."""
    g = np.random.default_rng(5)
    draws = 4000
    p = g.dirichlet(np.ones(3), draws)
    y = np.full((draws, 3), 0.1 / 3)
    y[np.arange(draws), g.integers(0, 3, draws)] += 0.9
    eta = max_step(_t(p), "support", target=_t(y)).numpy()
    infinite = np.isinf(safety.energy(projected_step(_t(p), _t(y), _t(eta)).numpy(), y)).mean()
    assert infinite > 0.4  # 48 % of these draws (the issue measured 5.7 % on its own draws)
    after = safety.energy(safety.mirror(p, y, eta), y)
    assert (after <= safety.energy(p, y) + 1e-12).all()  # measured, not a theorem for soft targets


@pytest.mark.parametrize("k", [3, 50, 8192])
def test_mirror_step_raises_the_label_probability_for_every_step_size(k):
    """One-hot label: the mirror step multiplies p_c's odds by e^{η/p_c} > 1, so E = −log p_c falls for any η > 0."""
    g = np.random.default_rng(k)
    p = g.dirichlet(np.full(k, 0.3))
    p = np.maximum(p, 1e-30)
    p /= p.sum()
    for c in (int(p.argmax()), int(p.argmin()), int(g.integers(k))):
        y = np.zeros(k)
        y[c] = 1.0
        for eta in (1e-6, 1e-2, 1.0, 1e3):
            new = mirror_step(_t(p), _t(y), eta).numpy()[c]
            assert new >= p[c] and (new > p[c] or p[c] > 1 - 1e-12 or eta * (1 - p[c]) / p[c] < 1e-15)
