"""The belief paper's dynamics (moved from tests/test_simplex.py with the code, issue 21): closed forms, FD Jacobians.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safestep.geometry import ads_step, max_step
from safestep_lab.simplex_dynamics import anchor, contraction_factor, mirror_step, project_to_simplex, projected_step
from test_lab_belief_maps import _library_test_module

f64 = torch.float64


_paper = _library_test_module("test_simplex")  # the library tests' paper-value helpers, one copy
t, assert_printed = _paper.t, _paper.assert_printed


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.special.xlogy(a, a).sum(-1) - torch.special.xlogy(a, b).sum(-1)


def random_beliefs(n: int, k: int, seed: int) -> torch.Tensor:
    return _dirichlet(n, k, torch.Generator().manual_seed(seed))


def _dirichlet(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    e = -torch.rand(n, k, generator=g, dtype=f64).log()  # Exp(1) draws normalised: uniform on the simplex
    return e / e.sum(-1, keepdim=True)


def tangent_basis(k: int) -> np.ndarray:
    """Orthonormal basis (K, K−1) of T = {Σv = 0}: eigenvectors of P_T = I − 11ᵀ/K with eigenvalue 1."""
    _, vecs = np.linalg.eigh(np.eye(k) - np.ones((k, k)) / k)
    return vecs[:, 1:]


def tangent_jacobian(step, y: torch.Tensor, eta: float, h: float = 1e-6) -> np.ndarray:
    """Central-difference Jacobian of p ↦ step(p, y, eta) at p = y, restricted to the tangent space."""
    basis = tangent_basis(y.shape[-1])
    cols = []
    for j in range(basis.shape[1]):
        u = torch.from_numpy(basis[:, j])
        cols.append(((step(y + h * u, y, eta) - step(y - h * u, y, eta)) / (2 * h)).numpy())
    return basis.T @ np.stack(cols, axis=1)



@pytest.mark.parametrize("k, seed", [(3, 0), (3, 1), (4, 2), (5, 3)])
def test_tangent_threshold_is_where_projected_step_loses_stability(k, seed):
    y = random_beliefs(1, k, seed=seed)[0] * 0.8 + 0.2 / k  # keep away from the boundary
    critical = max_step(y, "tangent").item()
    radius = lambda eta: np.abs(np.linalg.eigvals(tangent_jacobian(projected_step, y, eta))).max()
    assert radius(0.97 * critical) < 1.0 < radius(1.03 * critical)
    assert radius(critical) == pytest.approx(1.0, abs=1e-6)
    assert max_step(y, "paper") <= max_step(y, "sharp") <= max_step(y, "tangent")



# ---------------------------------------------------------------- projection, projected and mirror steps
def test_projection_satisfies_kkt_against_vertices_and_random_points():
    g = torch.Generator().manual_seed(11)
    for k in (2, 3, 7):
        v = torch.randn(200, k, generator=g, dtype=f64) * 2.0
        q = project_to_simplex(v)
        assert (q >= 0).all()
        np.testing.assert_allclose(q.sum(-1).numpy(), 1.0, atol=1e-12)
        vertices = torch.eye(k, dtype=f64)
        # ⟨v − q, r − q⟩ <= 0 for every vertex r is the full optimality certificate (linear in r)
        assert (torch.einsum("nk,mnk->mn", v - q, vertices[:, None, :] - q) <= 1e-12).all()
        r = _dirichlet(200, k, g)
        assert (((v - q) * (r - q)).sum(-1) <= 1e-12).all()
        assert torch.allclose(project_to_simplex(r), r, atol=1e-15)  # idempotent on Δ


def test_projected_step_is_projection_of_the_gradient_step():
    g = torch.Generator().manual_seed(12)
    p, y = _dirichlet(8, 4, g), _dirichlet(8, 4, g)
    eta = torch.rand(8, generator=g, dtype=f64)
    expected = project_to_simplex(p + eta[:, None] * y / p)
    assert torch.allclose(projected_step(p, y, eta), expected, atol=1e-15)


def test_mirror_step_matches_multiplicative_formula():
    g = torch.Generator().manual_seed(13)
    p, y = _dirichlet(10, 5, g), _dirichlet(10, 5, g)
    eta = np.linspace(0.01, 2.0, 10)
    pn, yn = p.numpy(), y.numpy()
    w = pn * np.exp(eta[:, None] * yn / pn)
    np.testing.assert_allclose(mirror_step(p, y, torch.from_numpy(eta)).numpy(), w / w.sum(-1, keepdims=True), rtol=1e-12)


@pytest.mark.parametrize("eta", [0.5, 0.99, 1.01, 1.5])
def test_mirror_step_local_factor_is_one_minus_eta(eta):
    for seed, k in [(0, 3), (1, 4), (2, 5)]:
        y = random_beliefs(1, k, seed=seed)[0] * 0.8 + 0.2 / k
        eigenvalues = np.linalg.eigvals(tangent_jacobian(mirror_step, y, eta))
        np.testing.assert_allclose(eigenvalues.real, 1 - eta, atol=1e-6)
        np.testing.assert_allclose(eigenvalues.imag, 0.0, atol=1e-6)


# ---------------------------------------------------------------- anchor and contraction
def test_anchor_is_empirical_distribution_and_fixed_point():
    g = torch.Generator().manual_seed(14)
    for labels, k in [(torch.randint(0, 4, (3, 50), generator=g), 4), ([0, 2, 2, 2, 0], 3)]:
        a = anchor(labels, k)
        expected = np.bincount(np.asarray(labels).reshape(-1), minlength=k) / np.asarray(labels).size
        np.testing.assert_allclose(a.numpy(), expected, rtol=0, atol=1e-15)
        for eta in (0.01, 1.0, 100.0):
            assert torch.allclose(projected_step(a, a, eta), a, atol=1e-12)
            assert torch.allclose(mirror_step(a, a, eta), a, atol=1e-12)
        other = torch.full((k,), 1.0 / k, dtype=f64)
        assert not torch.allclose(projected_step(other, a, 0.01), other)  # non-anchors do move


def test_contraction_factor_at_the_fixed_point():
    y = t([0.7, 0.2, 0.1])
    assert contraction_factor(y, y, max_step(y)).item() == pytest.approx(1.0, abs=1e-14)
    assert_printed(contraction_factor(y, y, max_step(y) / 4).item(), "0.998469")
    mu, lipschitz, chi2 = 1 / 0.7, 1 / 0.1, 1 / 0.1  # fastest guaranteed rate at η = μ/L²: 1 − μ²/(L²C)
    fastest = contraction_factor(y, y, mu / lipschitz**2).item()
    assert fastest == pytest.approx(1 - mu**2 / (lipschitz**2 * chi2), rel=1e-12)
    etas = torch.linspace(0.001, 0.05, 50, dtype=f64)
    assert (contraction_factor(y.expand(50, 3), y.expand(50, 3), etas) >= fastest - 1e-15).all()


def near(y: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """n beliefs within radius 0.3·min y of y (inside the simplex)."""
    d = torch.randn(n, y.shape[-1], generator=g, dtype=f64)
    d = d - d.mean(-1, keepdim=True)
    return y + d / d.norm(dim=-1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=f64) * 0.3 * y.min()


@pytest.mark.parametrize("y", [(0.7, 0.2, 0.1), (0.4, 0.35, 0.25), (0.5, 0.3, 0.2)])
def test_euclidean_contraction_with_box_constants(y):
    target = t(y)
    g = torch.Generator().manual_seed(15)
    p1, p2 = near(target, 2000, g), near(target, 2000, g)
    box_max, box_min = torch.maximum(p1, p2).amax(-1), torch.minimum(p1, p2).amin(-1)
    mu, lipschitz = target.min() / box_max**2, target.max() / box_min**2  # true Hessian diag(y/p²) on the box
    for fraction in (0.1, 0.5, 0.9):
        eta = fraction * 2 * mu / lipschitz**2
        ys = target.expand_as(p1)
        lhs = (projected_step(p1, ys, eta) - projected_step(p2, ys, eta)).norm(dim=-1)
        rhs = torch.sqrt(1 - 2 * eta * mu + eta**2 * lipschitz**2) * (p1 - p2).norm(dim=-1)
        assert (lhs <= rhs * (1 + 1e-9)).all()
        assert (lhs < (p1 - p2).norm(dim=-1)).all()


@pytest.mark.parametrize("y", [(0.7, 0.2, 0.1), (0.4, 0.35, 0.25), (0.5, 0.3, 0.2)])
def test_local_kl_contraction_with_contraction_factor(y):
    target = t(y)
    g = torch.Generator().manual_seed(16)
    p1, p2 = near(target, 2000, g), near(target, 2000, g)
    pair_threshold = 2 * torch.minimum(p1.amin(-1), p2.amin(-1)) ** 2 / torch.maximum(p1.amax(-1), p2.amax(-1))
    for fraction in (0.1, 0.5, 0.9):
        eta = fraction * pair_threshold
        q = contraction_factor(p1, p2, eta)
        assert (q < 1).all()
        ys = target.expand_as(p1)
        assert (kl(projected_step(p1, ys, eta), projected_step(p2, ys, eta)) <= q * kl(p1, p2)).all()


# ---------------------------------------------------------------- §7 canonical mirror-descent experiment
def test_canonical_mirror_descent_run_of_section_7():
    y1, y2 = t([0.7, 0.2, 0.1]), t([0.1, 0.2, 0.7])
    p = torch.full((3, 3), 1 / 3, dtype=f64)  # rows: High 1.5, Low 0.02, ADS-aware
    fixed = t([1.5, 0.02])
    ads_etas, post_shift_kl, exceeds = [], [], []
    for step in range(600):
        target = (y1 if step < 300 else y2).expand(3, 3)
        eta = torch.cat([fixed, ads_step(p[2]).reshape(1)])
        ads_etas.append(eta[2].item())
        exceeds.append((eta > max_step(p)).tolist())
        p = mirror_step(p, target, eta)
        if step >= 300:
            post_shift_kl.append(kl(y2.expand(3, 3), p))
    post_shift_kl = torch.stack(post_shift_kl)
    assert torch.equal(p[0], t([1.0, 0.0, 0.0]))  # High collapsed onto the phase-1 vertex e1
    assert kl(p[0], y2).item() == pytest.approx(math.log(10), rel=1e-12)
    steps_to = lambda row, threshold: int((post_shift_kl[:, row] < threshold).nonzero()[0]) + 1
    assert steps_to(1, 1e-4) <= 300 and steps_to(2, 1e-4) <= 300
    assert abs(steps_to(1, 1e-3) - 188) <= 2 and abs(steps_to(2, 1e-3) - 132) <= 2  # ADS is faster than Low
    assert_printed(ads_etas[0], "0.0277")
    assert_printed(min(ads_etas), "0.0126")
    assert_printed(max(ads_etas), "0.0753")
    exceeds = np.array(exceeds)
    assert exceeds[:, 0].all() and not exceeds[:, 1].any() and not exceeds[:, 2].any()


# ---------------------------------------------------------------- validation
def test_dynamics_validation_errors():
    p = t([0.7, 0.2, 0.1])
    with pytest.raises(ValueError, match="eta must be >= 0"):
        projected_step(p, p, -0.1)
    with pytest.raises(ValueError, match="shape"):
        mirror_step(p, t([0.5, 0.5]), 0.1)
    with pytest.raises(ValueError, match="integer"):
        anchor([0.0, 1.0], 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        anchor([0, 3], 3)
    with pytest.raises(ValueError, match="empty"):
        anchor([], 3)
    with pytest.raises(ValueError, match="sum to 1"):
        contraction_factor(p, t([0.7, 0.2, 0.2]), 0.01)
