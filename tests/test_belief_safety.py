"""Issue 18: what each belief rule guarantees, and a belief bound that never caps a step beyond a row's radius.

References are independent of the library's belief code: a bisection projection onto the simplex and the
multiplicative mirror step written out here, closed forms, the row loss evaluated along the logit-linearized path
z + τa, polynomial roots for commensurate slopes, and ``exact_radius`` (certified, and itself checked against
high-precision roots in test_radius.py). Counterexamples from the issue are kept as tests that document the
difference between the guarantees.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safestep import SafeStep
from safestep.bounds import IGNORE_INDEX, Belief, Exact, Ghost
from safestep.geometry import (
    belief_radius,
    belief_step_cap,
    exact_radius,
    max_step,
    weighted_radius,
)
from safestep.geometry.simplex import RULES, spread_radius

RTOL = 1e-10  # exact_radius certificate: (1 − rtol)·R <= ρ* <= R


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def project(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of each row onto the simplex by bisection on θ in Σ max(v − θ, 0) = 1."""
    lo, hi = v.min(-1, keepdims=True) - 1.0, v.max(-1, keepdims=True)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        above = np.maximum(v - mid, 0).sum(-1, keepdims=True) > 1
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return np.maximum(v - 0.5 * (lo + hi), 0)


def projected(p: np.ndarray, y: np.ndarray, eta) -> np.ndarray:
    return project(p + np.asarray(eta)[..., None] * y / p)


def mirror(p: np.ndarray, y: np.ndarray, eta) -> np.ndarray:
    u = np.asarray(eta)[..., None] * y / p
    w = p * np.exp(u - u.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


def kl(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(np.where(a > 0, a * np.log(np.where(a > 0, a, 1) / b), 0)))


def energy(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return -np.sum(np.where(y > 0, y * np.log(p), 0), axis=-1)


def row_loss(z: np.ndarray, a: np.ndarray, label: int, tau: float) -> float:
    """Cross-entropy of one row at logits z + τa, evaluated directly (log-sum-exp)."""
    u = z + tau * a
    m = u.max()
    return float(m + np.log(np.exp(u - m).sum()) - u[label])


# --- 1. the support rule: Euclidean-nonexpansive, not a KL contraction -------------------------------------------


def test_support_rule_pair_stays_euclidean_nonexpansive_while_kl_grows():
    """The issue's pair: one-hot label 0, η below the paper's rule and the support rule; KL(Fp1‖Fp2) grows."""
    p1, p2, y = np.array([0.5, 0.3, 0.2]), np.array([0.5, 0.2, 0.3]), np.array([1.0, 0, 0])
    support = 2 * 0.5**2 * 3 / 2  # 2·p_c²·K/(K − 1) = 0.75 at both beliefs
    paper = 2 * 0.2**2 / 0.5  # 2·min p²/max p = 0.16
    assert max_step(_t(p1), "support", target=_t(y)).item() == pytest.approx(support, rel=1e-12)
    assert max_step(_t(p1), "paper").item() == pytest.approx(paper, rel=1e-12)
    for eta, kl_ratio in ((0.01, 1.0282), (0.05, 1.1592), (0.15, 1.7095)):
        assert eta < paper < support
        f1, f2 = projected(p1, y, eta), projected(p2, y, eta)
        assert np.linalg.norm(f1 - f2) / np.linalg.norm(p1 - p2) == pytest.approx(1.0, abs=1e-9)
        assert kl(f1, f2) / kl(p1, p2) == pytest.approx(kl_ratio, abs=1e-4)
        assert kl(f1, f2) > kl(p1, p2)  # KL grows: no contraction, although η < 2μ/L² of the Fisher proxy
    m1, m2 = mirror(p1, y, 0.15), mirror(p2, y, 0.15)
    assert kl(m1, m2) / kl(p1, p2) == pytest.approx(0.8511, abs=1e-4)  # the mirror step on the same pair contracts


def test_support_rule_at_both_beliefs_keeps_any_target_pair_nonexpansive():
    """η <= min(η_support(p1; y), η_support(p2; y)) ⇒ ‖F p1 − F p2‖ <= ‖p1 − p2‖ for soft targets too."""
    g = np.random.default_rng(18)
    for k in (3, 5, 8):
        p1, p2, y = g.dirichlet(np.ones(k), 200), g.dirichlet(np.ones(k), 200), g.dirichlet(np.full(k, 0.5), 200)
        eta = np.minimum(*(max_step(_t(p), "support", target=_t(y)).numpy() for p in (p1, p2)))
        for frac in (0.5, 1.0):
            moved = np.linalg.norm(projected(p1, y, frac * eta) - projected(p2, y, frac * eta), axis=-1)
            assert (moved <= np.linalg.norm(p1 - p2, axis=-1) * (1 + 1e-9)).all()


def test_soft_target_projected_step_at_the_rule_can_make_the_energy_infinite():
    """The issue's belief: smoothing 0.1 on label 0; at η_support the projected step lands on e₀ (E = +∞)."""
    p, y = np.array([0.406, 0.301, 0.293]), np.array([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3])
    eta = max_step(_t(p), "support", target=_t(y)).item()
    assert eta == pytest.approx(0.5127, abs=1e-4)
    np.testing.assert_allclose(projected(p, y, eta), [1.0, 0.0, 0.0], atol=1e-12)
    after = mirror(p, y, eta)
    assert (after > 0).all() and energy(after, y) < energy(p, y)


# --- 2. the pull-back: first order, not a bound ------------------------------------------------------------------

ISSUE_LOGITS = np.log([0.5, 0.5 - 1e-6, 1e-6])
ISSUE_ROWS = {"flat label": np.array([0.0, -2e-5, 10.0]), "moving label": np.array([1.0, 0.0, 10.0])}


def test_first_order_pull_back_exceeds_the_radius_on_the_issue_rows():
    z = _t(np.stack([ISSUE_LOGITS, ISSUE_LOGITS]))
    a = _t(np.stack(list(ISSUE_ROWS.values())))
    labels = torch.tensor([0, 0])
    first_order = belief_step_cap(z, a, labels, rule="support", backoff=False).numpy()
    rho = exact_radius(z, a, RTOL).numpy()
    np.testing.assert_allclose(rho, [1.4168, 1.5189], atol=1e-4)
    assert first_order[0] > 1e9 * rho[0]  # a_c ≈ ā: "unbounded" while ρ* = 1.42
    assert first_order[1] == pytest.approx(4.0, rel=1e-4) and first_order[1] > rho[1]
    flat, moving = ISSUE_ROWS.values()
    assert row_loss(ISSUE_LOGITS, flat, 0, 2.0) - row_loss(ISSUE_LOGITS, flat, 0, 0.0) == pytest.approx(6.19, abs=0.01)
    assert row_loss(ISSUE_LOGITS, flat, 0, 10.0) - row_loss(ISSUE_LOGITS, flat, 0, 0.0) == pytest.approx(86.2, abs=0.1)
    change = row_loss(ISSUE_LOGITS, moving, 0, 4.0) - row_loss(ISSUE_LOGITS, moving, 0, 0.0)
    assert change == pytest.approx(22.18, abs=0.01)  # first order predicts −2 nats at the cap
    ghost = belief_radius(z, a, labels, rule="support", backoff=False, certified=spread_radius).numpy()
    np.testing.assert_allclose(ghost, math.pi / 10.0 * np.array([1 / (1 + 2e-6), 1.0]), rtol=1e-12)  # π/Δ_a binds
    safe = belief_radius(z, a, labels, rule="support", backoff=False).numpy()  # default: R_w, weighted by p
    assert (ghost <= safe).all() and (safe <= rho).all()


def test_belief_radius_is_the_smaller_of_the_pull_back_and_the_certified_radius():
    g = torch.Generator().manual_seed(3)
    z, a = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (40,), generator=g)
    a[::2].scatter_add_(1, labels[::2, None], torch.full((20, 1), 8.0, dtype=torch.float64))
    for rule in RULES:
        cap = belief_step_cap(z, a, labels, rule=rule)
        ghost = math.pi / (a.amax(-1) - a.amin(-1))
        assert torch.equal(belief_radius(z, a, labels, rule=rule, certified=spread_radius), torch.minimum(cap, ghost))
        assert torch.equal(belief_radius(z, a, labels, rule=rule), torch.minimum(cap, weighted_radius(z, a)))
    rho = exact_radius(z, a, RTOL)
    with_rho = belief_radius(z, a, labels, certified=lambda zz, aa: exact_radius(zz, aa, RTOL))
    assert torch.equal(with_rho, torch.minimum(belief_step_cap(z, a, labels, rule="support"), rho))
    support = belief_step_cap(z, a, labels, rule="support")
    assert (support < math.pi / (a.amax(-1) - a.amin(-1))).any() and (support > rho).any()  # both sides bind
    with pytest.raises(ValueError, match="one radius per row"):
        belief_radius(z, a, labels, certified=lambda zz, aa: spread_radius(zz, aa).amin())


def test_belief_radius_masked_classes_match_the_live_columns():
    g = torch.Generator().manual_seed(4)
    z, a = torch.randn(8, 7, generator=g, dtype=torch.float64), torch.randn(8, 7, generator=g, dtype=torch.float64)
    a[:, 5] = 100.0  # a masked class's slope must not count
    masked_z, masked_a = z.clone(), a.clone()
    masked_z[:, 5], masked_a[:, 6] = -math.inf, math.nan
    masked_z[:, 6] = -math.inf
    labels = torch.arange(8) % 5
    for certified in (weighted_radius, spread_radius):
        masked = belief_radius(masked_z, masked_a, labels, certified=certified)
        torch.testing.assert_close(masked, belief_radius(z[:, :5], a[:, :5], labels, certified=certified), rtol=1e-12,
                                   atol=0)


# --- 3. brute force: the belief bound never exceeds the exact radius ---------------------------------------------


def gaussian_rows(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    scale = g.choice([0.1, 1.0, 4.0], size=(n, 1))
    return scale * g.standard_normal((n, k)), g.standard_normal((n, k)) * g.choice([0.1, 1, 10], size=(n, 1)), \
        g.integers(0, k, n)


def lm_rows(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zipf beliefs (p ∝ rank^−s, noisy, shuffled), unit slopes, extreme slopes (±20…50) on the rarest 5 %."""
    g = np.random.default_rng(seed)
    z, a, labels = np.empty((n, k)), np.empty((n, k)), np.empty(n, dtype=np.int64)
    for i in range(n):
        s = g.choice([1.1, 1.5, 3.0])
        logp = -s * np.log(np.arange(1, k + 1)) + 0.3 * g.standard_normal(k)
        order = g.permutation(k)
        z[i] = logp[order]
        a[i] = g.standard_normal(k)
        rare = np.argsort(z[i])[: max(1, k // 20)]
        a[i, rare] = g.choice([-1, 1], rare.size) * g.uniform(20, 50, rare.size)
        p = np.exp(z[i] - z[i].max())
        p /= p.sum()
        labels[i] = g.choice(k, p=p) if i % 3 else int(g.choice(rare))
    return z, a, labels


def issue_rows(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows like the issue's: a nearly tied top pair, a tiny class with a large slope, the label's slope ≈ the mean."""
    g = np.random.default_rng(seed)
    tiny = 10.0 ** g.uniform(-9, -3, n)
    p = np.stack([0.5 * np.ones(n), 0.5 - tiny, tiny], axis=1)
    big = g.uniform(2, 20, n)
    a = np.stack([2 * tiny * big + g.normal(0, 0.1, n), np.zeros(n), big], axis=1)  # a_c − ā ≈ N(0, 0.05)
    return np.log(p), a, np.zeros(n, dtype=np.int64)


def _check_rows(z: np.ndarray, a: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """belief_radius <= ρ* for every rule, backoff, smoothing and certified radius (R_w, π/Δ_a); returns the worst
    ratio and the share of rows where the first-order pull-back alone exceeds ρ*."""
    zt, at, yt = _t(z), _t(a), torch.as_tensor(labels)
    rho = exact_radius(zt, at, RTOL)
    weighted, ghost = weighted_radius(zt, at), spread_radius(zt, at)
    worst, misses, total = 0.0, 0, 0
    for rule in RULES:
        for use_backoff in (True, False):
            for smoothing in (0.0, 0.1):
                first_order = belief_step_cap(zt, at, yt, rule, use_backoff, smoothing=smoothing)
                for certified in (weighted, ghost):
                    safe = belief_radius(zt, at, yt, rule, use_backoff, smoothing=smoothing,
                                         certified=lambda *_: certified)  # noqa: B023 (used at once)
                    assert (safe <= rho).all(), (rule, use_backoff, smoothing)
                    worst = max(worst, (safe / rho).max().item())
                misses += int((first_order > rho).sum())
                total += rho.numel()
    return {"worst": worst, "first_order_misses": misses / total}


@pytest.mark.parametrize("k", [3, 8])
def test_belief_radius_never_exceeds_the_exact_radius_on_gaussian_rows(k):
    result = _check_rows(*gaussian_rows(k, 60, seed=k))
    assert 0.3 < result["worst"] <= 1.0


def test_belief_radius_never_exceeds_the_exact_radius_on_issue_like_rows():
    z, a, labels = issue_rows(40, seed=1)
    result = _check_rows(z, a, labels)
    assert result["first_order_misses"] > 0.3  # the first-order pull-back alone overshoots ρ* on these rows


def test_belief_radius_never_exceeds_the_exact_radius_on_lm_rows():
    _check_rows(*lm_rows(256, 6, seed=256))


@pytest.mark.slow
@pytest.mark.parametrize("k,n", [(256, 60), (8192, 12)])
def test_belief_radius_never_exceeds_the_exact_radius_on_lm_rows_at_scale(k, n):
    _check_rows(*lm_rows(k, n, seed=k + 1))


def test_belief_radius_below_polynomial_root_radius_for_commensurate_slopes():
    """Slopes a = g·m (integers m >= 0): F(t) = P(e^{gt}), so ρ* = min_j |Log s_j|/g over the roots s_j of P."""
    rng = np.random.default_rng(11)
    for _ in range(80):
        k = int(rng.integers(2, 7))
        m = rng.integers(0, 6, k)
        m -= m.min()  # F = Σ w_k s^{m_k} then has a nonzero constant term: s = 0 is never a root
        gain = float(rng.uniform(0.1, 3.0))
        z = rng.normal(0, 2, k)
        w = np.exp(z - z.max())
        w /= w.sum()
        coefficients = np.zeros(m.max() + 1)
        np.add.at(coefficients, m.max() - m, w)
        rho = min((abs(np.log(complex(s))) for s in np.roots(coefficients)), default=math.inf) / gain
        label = int(rng.integers(k))
        for rule in RULES:
            safe = belief_radius(_t(z[None]), _t(gain * m[None]), torch.tensor([label]), rule).item()
            assert safe <= rho * (1 + 1e-9)


# --- 4. the bound --------------------------------------------------------------------------------------------------


def test_belief_bound_rows_are_capped_by_the_certified_bound():
    z, a, labels = lm_rows(64, 10, seed=7)
    zt, at, yt = _t(z), _t(a), torch.as_tensor(labels)
    yt[3] = IGNORE_INDEX
    first_order = belief_step_cap(zt, at, torch.where(yt == IGNORE_INDEX, 0, yt), rule="support")
    for bound, certified in ((Belief(), weighted_radius(zt, at)), (Belief(certified=Ghost()), spread_radius(zt, at))):
        expected = torch.minimum(first_order, certified)
        expected[3] = math.inf
        assert torch.equal(bound.row_radii(zt, at, yt), expected)
    rows = Belief().row_radii(zt, at, yt)
    with_exact = Belief(certified=Exact(rtol=RTOL)).row_radii(zt, at, yt)
    rho = exact_radius(zt, at, RTOL)
    assert (with_exact[yt != IGNORE_INDEX] <= rho[yt != IGNORE_INDEX]).all() and (with_exact >= rows).all()
    with pytest.raises(ValueError, match="certified"):
        Belief(certified="ghost")


class LinearLogits(nn.Module):
    """Row n's logits are z0_n + M_n θ: exactly linear in the parameters, so the line loss is the linearized one."""

    def __init__(self, z0: torch.Tensor, m: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("z0", z0)
        self.register_buffer("m", m)
        self.theta = nn.Parameter(torch.zeros(m.shape[-1], dtype=torch.float64))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.z0[rows] + self.m[rows] @ self.theta


class Prescribed(torch.optim.Optimizer):
    """An optimizer whose update is a fixed vector, whatever the gradient."""

    def __init__(self, params, update: torch.Tensor) -> None:
        super().__init__(params, {})
        self.update = update

    @torch.no_grad()
    def step(self, closure=None):
        self.param_groups[0]["params"][0].add_(self.update)


def test_safestep_belief_bound_never_steps_beyond_the_probed_rows_exact_radius():
    """The issue's user check: a row with p = (.5, .5 − 1e-6, 1e-6), label 0, slopes (0, −2e-5, 10) along the update."""
    g = torch.Generator().manual_seed(0)
    z0 = torch.cat([_t(ISSUE_LOGITS)[None], torch.randn(7, 3, generator=g, dtype=torch.float64)])
    m = torch.randn(8, 3, 2, generator=g, dtype=torch.float64) * 0.1
    m[0, :, 0] = _t(ISSUE_ROWS["flat label"])  # the update moves θ along its first coordinate only
    labels = torch.cat([torch.tensor([0]), z0[1:].argmax(-1)])
    slopes = m[:, :, 0]
    rho = exact_radius(z0, slopes, RTOL)
    assert rho.argmin().item() == 0
    update = torch.tensor([4.0, 0.0], dtype=torch.float64)  # 2.8 ρ* of row 0
    assert belief_step_cap(z0, slopes, labels, rule="support").min() > update.norm()  # the old cap lets it through
    model = LinearLogits(z0, m)
    rows = torch.arange(8)
    before = F.cross_entropy(model(rows), labels, reduction="none").detach()
    opt = SafeStep(Prescribed(model.parameters(), update), model, bound="belief", probe_size=None, method="jvp")
    loss = F.cross_entropy(model(rows), labels)
    opt.zero_grad()
    loss.backward()
    opt.step(labels=labels)
    applied = model.theta.detach().norm().item()
    assert 0 < applied <= rho.min().item()
    after = F.cross_entropy(model(rows), labels, reduction="none").detach()
    direct = row_loss(ISSUE_LOGITS, ISSUE_ROWS["flat label"], 0, applied)
    assert after[0].item() == pytest.approx(direct, rel=1e-9)
    assert after[0] - before[0] < 1.0  # against +9.3 nats at the proposed step
    assert row_loss(ISSUE_LOGITS, ISSUE_ROWS["flat label"], 0, 4.0) - before[0].item() > 9
