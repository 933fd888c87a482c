"""Curvature comparators vs the full Hessian from torch.autograd.functional.hessian and numpy.linalg.eigvalsh."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safestep_lab.curvature import directional_curvature, hessian_step, top_hessian_eigenvalue

SHAPES = {"w1": (4, 5), "b1": (4,), "w2": (3, 4), "b2": (3,)}  # a 5 -> 4 -> 3 tanh MLP


def mlp_loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return F.cross_entropy(hidden @ params["w2"].T + params["b2"], y)


def unflatten(theta: torch.Tensor) -> dict:
    out, i = {}, 0
    for name, shape in SHAPES.items():
        n = math.prod(shape)
        out[name] = theta[i : i + n].reshape(shape)
        i += n
    return out


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    theta = torch.randn(sum(math.prod(s) for s in SHAPES.values()), generator=g, dtype=torch.float64)
    hessian = torch.autograd.functional.hessian(lambda t: mlp_loss(unflatten(t), x, y), theta).numpy()
    return x, y, theta, hessian


def test_directional_curvature_matches_full_hessian_dict_and_list(problem):
    x, y, theta, hessian = problem
    params = unflatten(theta.clone())
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        v = torch.randn(theta.shape, generator=g, dtype=torch.float64) * 3.0  # unnormalised on purpose
        expected = float(v @ torch.from_numpy(hessian) @ v / (v @ v))
        kappa_dict = directional_curvature(lambda ps: mlp_loss(ps, x, y), params, unflatten(v))
        names = list(SHAPES)
        kappa_list = directional_curvature(
            lambda ts: mlp_loss(dict(zip(names, ts)), x, y), [params[n] for n in names], [unflatten(v)[n] for n in names]
        )
        assert kappa_dict.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert kappa_list.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_directional_curvature_leaves_parameters_untouched(problem):
    x, y, theta, _ = problem
    params = {k: v.clone().requires_grad_(True) for k, v in unflatten(theta).items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    directional_curvature(lambda ps: mlp_loss(ps, x, y), params, {k: torch.ones_like(v) for k, v in params.items()})
    for k, v in params.items():
        assert v.grad is None
        assert torch.equal(v.detach(), before[k])


def test_top_eigenvalue_matches_eigvalsh(problem):
    x, y, theta, hessian = problem
    expected = np.linalg.eigvalsh(hessian)[-1]
    lam = top_hessian_eigenvalue(lambda ps: mlp_loss(ps, x, y), unflatten(theta), iters=2000, tol=1e-13)
    assert lam.item() == pytest.approx(expected, rel=1e-6)


def test_top_eigenvalue_is_deterministic_given_seed(problem):
    x, y, theta, _ = problem
    run = lambda seed: top_hessian_eigenvalue(lambda ps: mlp_loss(ps, x, y), unflatten(theta), iters=7, seed=seed).item()
    assert run(1) == run(1)
    assert run(1) != run(2)  # 7 iterations are not converged, so the start vector shows


def test_top_eigenvalue_is_algebraic_when_negative_curvature_dominates():
    diagonal = torch.tensor([-5.0, 1.0, 2.0, 0.5], dtype=torch.float64)
    quadratic = lambda ts: 0.5 * (diagonal * ts[0] ** 2).sum()  # Hessian diag(-5, 1, 2, 0.5): |λ| largest is -5
    lam = top_hessian_eigenvalue(quadratic, [torch.ones(4, dtype=torch.float64)], iters=1000, tol=1e-14)
    assert lam.item() == pytest.approx(2.0, rel=1e-6)
    kappa = directional_curvature(quadratic, [torch.zeros(4, dtype=torch.float64)], [torch.tensor([1.0, 0, 0, 1.0])])
    assert kappa.item() == pytest.approx((-5.0 + 0.5) / 2)


def test_hessian_step():
    out = hessian_step(torch.tensor([4.0, 0.0, -1.0]))
    assert out.tolist() == [0.5, math.inf, math.inf]
    assert hessian_step(0.25).item() == 8.0


def test_validation_errors(problem):
    x, y, theta, _ = problem
    params = unflatten(theta)
    loss = lambda ps: mlp_loss(ps, x, y)
    with pytest.raises(ValueError, match="non-zero norm"):
        directional_curvature(loss, params, {k: torch.zeros_like(v) for k, v in params.items()})
    with pytest.raises(ValueError, match="keys"):
        directional_curvature(loss, params, {"w1": params["w1"]})
    with pytest.raises(ValueError, match="does not match parameter"):
        directional_curvature(lambda ts: ts[0].sum() ** 2, [torch.ones(3)], [torch.ones(4)])
    with pytest.raises(ValueError, match="scalar"):
        directional_curvature(lambda ts: ts[0] ** 2, [torch.ones(3)], [torch.ones(3)])
    frozen = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend"):
        directional_curvature(lambda ts: (frozen**2).sum() + 0 * ts[0].sum(), [torch.ones(3)], [torch.ones(3)])
    with pytest.raises(ValueError, match="list of tensors or a dict"):
        top_hessian_eigenvalue(loss, theta)
    with pytest.raises(ValueError, match="iters"):
        top_hessian_eigenvalue(loss, params, iters=0)
    with pytest.raises(ValueError, match="NaN"):
        hessian_step(float("nan"))
