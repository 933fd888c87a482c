"""Precision and input validation of the lab's belief dynamics and curvature step (split from
tests/test_geometry_precision.py with the code, issue 21): float64 from Python numbers, no NaN from zero entries,
ValueError on empty and non-numeric input."""
from __future__ import annotations

import math

import pytest
import torch

from safestep_lab.curvature import hessian_step
from safestep_lab.simplex_dynamics import contraction_factor, mirror_step, project_to_simplex, projected_step

f64 = torch.float64
P = torch.tensor([[0.4, 0.3, 0.3], [0.25, 0.25, 0.5]], dtype=f64)
Y = torch.tensor([[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]], dtype=f64)  # η = 0.7 keeps every coordinate


def test_python_floats_give_the_float64_result_exactly():
    eta64 = torch.tensor(0.7, dtype=f64)
    eta32 = torch.tensor(0.7, dtype=torch.float32)
    for call in (lambda eta: projected_step(P, Y, eta), lambda eta: mirror_step(P, Y, eta),
                 lambda eta: contraction_factor(P, P, eta), hessian_step):
        exact = call(eta64)
        assert torch.equal(call(0.7), exact)
        assert not torch.equal(call(eta32), exact)  # what a float32 detour gives: the test can tell
    assert hessian_step(0.7).item() == 2 / 0.7


def test_python_lists_give_the_float64_result_exactly():
    v = [0.7, 0.2, 0.3]
    assert torch.equal(project_to_simplex(v), project_to_simplex(torch.tensor(v, dtype=f64)))


@pytest.mark.parametrize("bad", ["0.7", [[0.1, 0.2], [0.3]], [True, False], [1 + 2j]])
def test_non_numeric_input_raises_value_error(bad):
    with pytest.raises(ValueError, match="real numeric"):
        hessian_step(bad)


def test_contraction_factor_with_zero_entries_is_not_nan():
    with_zero = torch.tensor([0.0, 0.5, 0.5], dtype=f64)
    other = torch.tensor([0.2, 0.3, 0.5], dtype=f64)
    for p1, p2 in [(with_zero, other), (other, with_zero), (with_zero, with_zero)]:
        assert contraction_factor(p1, p2, 0.1).item() == math.inf  # L = ∞: no contraction certified
        assert contraction_factor(p1, p2, 0.0).item() == 1.0
    etas = torch.tensor([0.0, 0.01, 0.02], dtype=f64)
    q = contraction_factor(other.expand(3, 3), torch.tensor([0.3, 0.3, 0.4], dtype=f64).expand(3, 3), etas)
    mu, lipschitz, chi2 = 1 / 0.5, 1 / 0.2, 1 / 0.3  # the paper's q = 1 − η(2μ − ηL²)/C with the pair's constants
    expected = [1 - e * (2 * mu - e * lipschitz**2) / chi2 for e in (0.0, 0.01, 0.02)]
    assert torch.allclose(q, torch.tensor(expected, dtype=f64), rtol=1e-14)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 4)])
def test_empty_inputs_raise_value_error(shape):
    empty = torch.zeros(shape, dtype=f64)
    calls = [project_to_simplex, lambda x: projected_step(x, x, 0.1), lambda x: mirror_step(x, x, 0.1),
             lambda x: contraction_factor(x, x, 0.1)]
    for call in calls:
        with pytest.raises(ValueError, match="empty"):
            call(empty)


def test_empty_scalar_inputs_raise_value_error():
    for call in (lambda: hessian_step(torch.zeros(0)), lambda: projected_step(P, Y, torch.zeros(0))):
        with pytest.raises(ValueError, match="empty"):
            call()
