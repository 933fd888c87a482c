"""Belief-space step bounds vs the paper's values (Li & Li, arXiv 2605.06741), closed forms and finite differences."""
from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pytest
import torch

from safestep.geometry.simplex import (
    RULES,
    ads_step,
    backoff,
    barrier,
    belief_step_cap,
    max_step,
    mse_step,
    normalized_entropy,
)

f64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=f64)


def assert_printed(value: float, printed: str) -> None:
    """``value`` rounds to the printed reference: |value − ref| <= half a unit in its last printed digit."""
    unit = Decimal(1).scaleb(Decimal(printed).as_tuple().exponent)
    assert abs(value - float(printed)) <= 0.5 * float(unit) * 1.001, (value, printed)


def random_beliefs(n: int, k: int, seed: int) -> torch.Tensor:
    return _dirichlet(n, k, torch.Generator().manual_seed(seed))


def _dirichlet(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    e = -torch.rand(n, k, generator=g, dtype=f64).log()  # Exp(1) draws normalised: uniform on the simplex
    return e / e.sum(-1, keepdim=True)


# ---------------------------------------------------------------- §4 closed-form CE bound and entropy backoff
# p, η^CE_max (exact), B, α (exact), η_CE (exact α): reference values of the paper's §5 (Li & Li 2026)
TABLE_4 = [
    ((0.7, 0.2, 0.1), 2 * 0.1**2 / 0.7, "0.7298467", "1.3087657", "0.0123752"),
    ((0.98, 0.01, 0.01), 2 * 0.01**2 / 0.98, "0.1018576", "0.1074267", "1.842846e-4"),
    ((0.6, 0.3, 0.1), 2 * 0.1**2 / 0.6, "0.8173454", "1.7001585", "0.0123450"),
    ((0.9, 0.1), 2 * 0.1**2 / 0.9, "0.4689956", "0.6329850", "0.0136083"),
    ((0.4, 0.3, 0.2, 0.1), 2 * 0.1**2 / 0.4, "0.9232197", "2.5668068", "0.0140181"),
]


@pytest.mark.parametrize("p, eta_max, B, alpha, eta_ce", TABLE_4)
def test_reference_table_section_4(p, eta_max, B, alpha, eta_ce):
    belief = t(p)
    assert max_step(belief).item() == pytest.approx(eta_max, rel=1e-12)
    assert_printed(normalized_entropy(belief).item(), B)
    assert_printed(barrier(normalized_entropy(belief), eps=0.0).item(), alpha)
    assert_printed(ads_step(belief, eps=0.0).item(), eta_ce)
    assert ads_step(belief).item() == pytest.approx(float(eta_ce), rel=1e-5)  # ε = 1e-10 barely moves it


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_uniform_belief_exact_barrier_is_infinite(k):
    uniform = torch.full((k,), 1.0 / k, dtype=f64)
    assert max_step(uniform).item() == pytest.approx(2.0 / k, rel=1e-12)
    assert normalized_entropy(uniform).item() == pytest.approx(1.0, abs=1e-15)
    assert barrier(t(1.0), eps=0.0).item() == math.inf
    assert ads_step(uniform, eps=0.0).item() == 0.0
    assert backoff(uniform, eps=0.0).item() == 0.0
    # ε-regularised: (2/K)/(1 − log(1e-10))
    assert ads_step(uniform).item() == pytest.approx((2.0 / k) / (1.0 - math.log(1e-10)), rel=1e-6)


def test_uniform_k3_regularised_value_and_half_binary():
    assert_printed(ads_step(torch.full((3,), 1 / 3, dtype=f64)).item(), "0.027748")
    assert_printed(ads_step(t([0.5, 0.5])).item(), "0.0416")


def test_binary_slice_of_figure_2():
    for tt, printed in [(1e-3, "2.0e-6"), (0.1, "0.0222"), (0.3, "0.257"), (0.5, "1.0")]:
        assert_printed(max_step(t([tt, 1 - tt])).item(), printed)
    grid = torch.linspace(0.001, 0.5, 4991, dtype=f64)
    slice_ = torch.stack([grid, 1 - grid], dim=-1)
    ads = ads_step(slice_, eps=0.0)
    assert ads[-1].item() == 0.0  # η_ADS collapses at the exact centre
    assert_printed(ads.max().item(), "0.124")
    assert_printed(grid[ads.argmax()].item(), "0.444")


def test_barrier_is_accurate_next_to_the_uniform_belief():
    d = 2.0**-27  # 0.5 ± d is exact in float64; 1 − B ≈ 2d²/log 2 ≈ 1.6e-16, below the rounding of H
    deficit = ((0.5 + d) * math.log1p(2 * d) + (0.5 - d) * math.log1p(-2 * d)) / math.log(2)
    assert backoff(t([0.5 + d, 0.5 - d]), eps=0.0).item() == pytest.approx(1 / (1 - math.log(deficit)), rel=1e-6)


def test_entropy_matches_numpy_and_limits():
    p = random_beliefs(50, 5, seed=1)
    pn = p.numpy()
    expected = -(pn * np.log(pn)).sum(-1) / np.log(5)
    np.testing.assert_allclose(normalized_entropy(p).numpy(), expected, rtol=1e-12, atol=1e-15)
    assert normalized_entropy(t([0.0, 1.0, 0.0])).item() == 0.0  # 0·log 0 = 0
    assert backoff(t([0.0, 1.0, 0.0])).item() == pytest.approx(1.0, abs=1e-9)
    b = normalized_entropy(p)
    np.testing.assert_allclose(barrier(b, eps=0.0).numpy(), -np.log(1 - expected), rtol=1e-10)
    np.testing.assert_allclose(ads_step(p).numpy(), (max_step(p) * backoff(p)).numpy(), rtol=1e-14)
    assert (ads_step(p) <= max_step(p)).all()


# ---------------------------------------------------------------- §3 rules: paper, sharp, tangent
TABLE_3 = [
    ((0.7, 0.2, 0.1), "0.02857", "0.2", "0.25119"),
    ((0.5, 0.3, 0.2), "0.16", "0.4", "0.4638"),
    ((0.98, 0.01, 0.01), "2.04e-4", "0.02", "0.02"),
    ((1 / 3, 1 / 3, 1 / 3), "0.6667", "0.6667", "0.6667"),
]


@pytest.mark.parametrize("y, paper, sharp, tangent", TABLE_3)
def test_reference_table_section_3(y, paper, sharp, tangent):
    belief = t(y)
    for rule, printed in zip(RULES, (paper, sharp, tangent)):
        assert_printed(max_step(belief, rule).item(), printed)


def test_tangent_rule_matches_eigvalsh_and_k3_quadratic():
    for k in (2, 3, 4, 5, 8):
        p = random_beliefs(20, k, seed=k)
        p[0] = t([0.05, 0.05] + [0.9 / (k - 2)] * (k - 2) if k > 2 else [0.5, 0.5])  # two smallest entries tie
        p[1] = torch.full((k,), 1.0 / k, dtype=f64)
        p[2, 0], p[2, 1:] = 1e-9, (1 - 1e-9) / (k - 1)
        for row in p.numpy():
            proj = np.eye(k) - np.ones((k, k)) / k
            theta = np.linalg.eigvalsh(proj @ np.diag(1 / row) @ proj)[-1]
            assert max_step(torch.from_numpy(row), "tangent").item() == pytest.approx(2 / theta, rel=1e-9)
    y0, y1, y2 = 0.7, 0.2, 0.1  # θ_max = larger root of 3·y0y1y2·θ² − 2(y0y1+y0y2+y1y2)θ + 1 = 0
    theta = max(np.roots([3 * y0 * y1 * y2, -2 * (y0 * y1 + y0 * y2 + y1 * y2), 1]).real)
    assert max_step(t([y0, y1, y2]), "tangent").item() == pytest.approx(2 / theta, rel=1e-12)

def test_rules_vanish_on_the_boundary():
    for rule in ("paper", "sharp", "tangent"):  # Fisher rules: any zero entry (curvature 1/p = ∞) gives 0
        assert max_step(t([0.0, 0.3, 0.7]), rule).item() == 0.0
    # "support" only sees the target's support: a zero off it is harmless, a zero on it gives 0
    assert max_step(t([0.0, 0.3, 0.7]), "support", target=t([0.0, 0.0, 1.0])).item() > 0.0
    assert max_step(t([0.0, 0.3, 0.7]), "support", target=t([0.5, 0.0, 0.5])).item() == 0.0


# ---------------------------------------------------------------- §6 MSE comparison
def test_mse_step_values_and_energy_ratio():
    assert_printed(mse_step(B=0.9).item(), "0.30279")
    assert_printed(mse_step(B=t([0.5])).item(), "0.59062")
    g = torch.Generator().manual_seed(5)
    p, y = _dirichlet(1, 4, g)[0], _dirichlet(1, 4, g)[0]
    energy = lambda q: 0.5 * ((q - y) ** 2).sum().item()
    for s in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0):
        assert energy((1 - s) * p + s * y) == pytest.approx((1 - s) ** 2 * energy(p), rel=1e-12, abs=1e-18)
    s = mse_step(B=0.9).item()
    assert_printed(energy((1 - s) * p + s * y) / energy(p), "0.4861")


def test_mse_step_from_belief_equals_entropy_form():
    p = random_beliefs(6, 3, seed=9).reshape(2, 3, 3)
    from_p = mse_step(p)
    assert from_p.shape == (2, 3)
    np.testing.assert_allclose(from_p.numpy(), mse_step(B=normalized_entropy(p)).numpy(), rtol=1e-12)
    pn = p.numpy()
    b = -(pn * np.log(pn)).sum(-1) / np.log(3)
    np.testing.assert_allclose(from_p.numpy(), 1 / (1 - np.log(1 - b + 1e-10)), rtol=1e-10)

# ---------------------------------------------------------------- §8 pull-back cap
def test_belief_step_cap_against_finite_differences():
    g = torch.Generator().manual_seed(17)
    z, a = torch.randn(40, 4, generator=g, dtype=f64) * 2, torch.randn(40, 4, generator=g, dtype=f64)
    labels = torch.randint(0, 4, (40,), generator=g)
    tau = 1e-7
    p = torch.softmax(z, -1).numpy()
    dp = (torch.softmax(z + tau * a, -1) - torch.softmax(z - tau * a, -1)).numpy() / 2  # Δp for a step τ
    onehot = np.eye(4)[labels.numpy()]
    grad = -onehot / p
    grad_t = grad - grad.mean(-1, keepdims=True)
    b = -(p * np.log(p)).sum(-1) / np.log(4)
    for rule, use_backoff in [("paper", True), ("paper", False), ("tangent", True)]:
        eta_adm = max_step(torch.from_numpy(p), rule).numpy()
        if use_backoff:
            eta_adm = eta_adm / (1 - np.log(1 - b + 1e-10))
        eta_eff = np.linalg.norm(dp, axis=-1) / np.linalg.norm(grad_t, axis=-1)  # linear in τ
        expected = eta_adm * tau / eta_eff
        cap = belief_step_cap(z, a, labels, rule=rule, backoff=use_backoff)
        np.testing.assert_allclose(cap.numpy(), expected, rtol=1e-6)


def test_belief_step_cap_without_labels_is_worst_case_over_labels():
    g = torch.Generator().manual_seed(19)
    z, a = torch.randn(2, 3, 5, generator=g, dtype=f64), torch.randn(2, 3, 5, generator=g, dtype=f64)
    unlabeled = belief_step_cap(z, a)
    assert unlabeled.shape == (2, 3)
    assert torch.allclose(unlabeled, belief_step_cap(z, a, z.argmax(-1)), rtol=1e-14)
    for c in range(5):
        assert (unlabeled <= belief_step_cap(z, a, torch.full((2, 3), c)) * (1 + 1e-12)).all()


def test_belief_step_cap_edge_cases():
    z = t([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, 0.0, 900.0]])
    a = t([[3.0, 3.0, 3.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    cap = belief_step_cap(z, a, torch.tensor([0, 1, 2]))
    assert cap[0].item() == math.inf  # constant slopes: the belief does not move
    assert 0 < cap[1].item() < math.inf
    assert cap[2].item() == 0.0  # min p underflows to 0: no admissible step


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "bad, message",
    [
        ([0.5, -0.1, 0.6], "negative"),
        ([0.5, 0.2, 0.2], "sum to 1"),
        ([0.5, float("nan"), 0.5], "NaN"),
        ([0.5, float("inf"), 0.5], "inf"),
        ([1.0], "K >= 2"),
        (1.0, "scalar"),
    ],
)
def test_invalid_beliefs_raise(bad, message):
    for fn in (normalized_entropy, max_step, ads_step, backoff, mse_step):
        with pytest.raises(ValueError, match=message):
            fn(t(bad))


def test_other_validation_errors():
    p = t([0.7, 0.2, 0.1])
    with pytest.raises(ValueError, match="'paper', 'sharp', 'tangent', 'support'"):
        max_step(p, "fast")
    with pytest.raises(ValueError, match="exactly one"):
        mse_step(p, B=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        mse_step()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        barrier(1.5)
    with pytest.raises(ValueError, match="eps"):
        backoff(p, eps=-1.0)
    with pytest.raises(ValueError, match="one label per row"):
        belief_step_cap(torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(3, dtype=torch.long))
