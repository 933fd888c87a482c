"""Geometry precision and input validation (issue 8): float64 from Python numbers, backoff <= 1, no NaN from zero
entries, and ValueError (never RuntimeError or silent garbage) for overflowing spreads and empty inputs."""
from __future__ import annotations

import math

import pytest
import torch

from safestep.geometry import (
    ads_step,
    backoff,
    barrier,
    belief_step_cap,
    binary_radius,
    exact_radius,
    max_step,
    min_exact_radius,
    mse_step,
    nearest_ghost,
    normalized_entropy,
    radius_lower_bound,
    spread,
)

f64 = torch.float64


# ------------------------------------------------------------------------- Python numbers are read as float64

def test_python_floats_give_the_float64_result_exactly():
    eta64 = torch.tensor(0.7, dtype=f64)
    eta32 = torch.tensor(0.7, dtype=torch.float32)
    for call in (barrier, mse_step_of_b, lambda margin: binary_radius(margin, 0.3)):
        exact = call(eta64)
        assert torch.equal(call(0.7), exact)
        assert not torch.equal(call(eta32), exact)  # what a float32 detour gives: the test can tell


def mse_step_of_b(b):
    return mse_step(B=b)


def test_python_lists_give_the_float64_result_exactly():
    assert max_step([0.7, 0.2, 0.1]).item() == 2 * 0.1**2 / 0.7
    assert spread([0.7, 0.1]).item() == 0.7 - 0.1
    assert radius_lower_bound([[0.3, 1.0]]).item() == math.pi / (1.0 - 0.3)
    assert torch.equal(mse_step(B=[0.7, 0.3]), mse_step(B=torch.tensor([0.7, 0.3], dtype=f64)))


@pytest.mark.parametrize("bad", ["0.7", [[0.1, 0.2], [0.3]], [True, False], [1 + 2j]])
def test_non_numeric_input_raises_value_error(bad):
    with pytest.raises(ValueError, match="real numeric"):
        barrier(bad)


# ------------------------------------------------------------------------- backoff edge cases

@pytest.mark.parametrize("eps", [1e-10, 1e-3, 0.5])
def test_backoff_of_a_one_hot_belief_is_one(eps):
    one_hot = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=f64)
    assert torch.equal(backoff(one_hot, eps=eps), torch.ones(2, dtype=f64))
    assert barrier(0.0, eps=eps).item() == 0.0
    assert torch.equal(ads_step(one_hot, eps=eps), max_step(one_hot))
    near_uniform = torch.full((3,), 1 / 3, dtype=f64)
    assert 0 < backoff(near_uniform, eps=eps).item() < 1


# ------------------------------------------------------------------------- overflow and empty input

def test_overflowing_spreads_raise_value_error():
    slopes = torch.tensor([[1e308, -1e308, 0.0]], dtype=f64)
    logits = torch.zeros(1, 3, dtype=f64)
    for call in (lambda: spread(slopes), lambda: radius_lower_bound(slopes), lambda: exact_radius(logits, slopes),
                 lambda: nearest_ghost(logits, slopes), lambda: min_exact_radius(logits, slopes),
                 lambda: belief_step_cap(logits, slopes)):
        with pytest.raises(ValueError, match="overflows"):
            call()
    assert spread(torch.tensor([[1e307, -1e307]], dtype=f64)).item() == 2e307  # large but finite is fine


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (2, 0, 4)])
def test_empty_inputs_raise_value_error(shape):
    empty = torch.zeros(shape, dtype=f64)
    calls = [spread, radius_lower_bound, normalized_entropy, backoff, max_step, ads_step,
             lambda x: exact_radius(x, x), lambda x: nearest_ghost(x, x), lambda x: min_exact_radius(x, x),
             lambda x: belief_step_cap(x, x), lambda x: mse_step(x)]
    for call in calls:
        with pytest.raises(ValueError, match="empty"):
            call(empty)


def test_empty_scalar_inputs_raise_value_error():
    for call in (lambda: binary_radius([], []), lambda: barrier([]), lambda: mse_step(B=[])):
        with pytest.raises(ValueError, match="empty"):
            call()
