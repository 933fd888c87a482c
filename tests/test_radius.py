"""Tests of safestep.geometry.radius against closed forms, numpy.roots and brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safestep.geometry.radius import (
    binary_radius,
    exact_radius,
    min_exact_radius,
    nearest_ghost,
    radius_lower_bound,
    spread,
)


def softmax_np(logits: np.ndarray) -> np.ndarray:
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def relative_residual_np(logits: np.ndarray, slopes: np.ndarray, t: np.ndarray) -> np.ndarray:
    """|F(t)| / Σ_k |w_k e^{a_k t}| with plain numpy complex arithmetic, rows in the last dim."""
    log_terms = np.log(softmax_np(logits)) + slopes * t[..., None]
    shift = log_terms.real.max(axis=-1, keepdims=True)
    terms = np.exp(log_terms - shift)
    return np.abs(terms.sum(axis=-1)) / np.abs(terms).sum(axis=-1)


def commensurate_zeros(logits: np.ndarray, powers: np.ndarray, g: float) -> np.ndarray:
    """Zeros t = Log(s_j)/g (principal log, the nearest image of each root) of Σ w_k s^{m_k}, s = e^{g t}."""
    coeffs = np.zeros(powers.max() - powers.min() + 1)
    np.add.at(coeffs, powers - powers.min(), softmax_np(logits))
    return np.log(np.roots(coeffs[::-1]).astype(complex)) / g


def random_commensurate(rng: np.random.Generator, k: int, rows: int):
    logits = rng.standard_normal((rows, k)) * rng.uniform(0.0, 10.0, (rows, 1))
    powers = rng.integers(0, 9, (rows, k))
    flat = powers.max(axis=1) == powers.min(axis=1)
    powers[flat, 0] = powers[flat, 1] + 1  # keep Δ_a > 0
    g = rng.uniform(0.1, 3.0, rows)
    return logits, powers, g


# --------------------------------------------------------------------------------------------- closed forms

def test_spread_and_lower_bound_closed_forms():
    a = torch.tensor([[0.5, -1.0, 2.0], [3.0, 3.0, 3.0]])
    assert torch.allclose(spread(a), torch.tensor([3.0, 0.0], dtype=torch.float64))
    lb = radius_lower_bound(a)
    assert lb[0].item() == pytest.approx(math.pi / 3.0) and math.isinf(lb[1].item())


def test_binary_radius_closed_form_and_broadcast():
    r = binary_radius(torch.tensor([0.0, 3.0, -4.0]), torch.tensor([2.0, -1.0, 0.5]))
    expected = [math.pi / 2.0, math.hypot(3.0, math.pi), math.hypot(4.0, math.pi) / 0.5]
    assert torch.allclose(r, torch.tensor(expected, dtype=torch.float64))
    assert math.isinf(binary_radius(1.0, 0.0).item())


# ------------------------------------------------------------------------------ exact radius vs numpy.roots

@pytest.mark.parametrize("k", range(2, 13))
def test_exact_radius_matches_polynomial_roots(k):
    rng = np.random.default_rng(100 + k)
    rows = 48  # 11 values of K x 48 = 528 random cases
    logits, powers, g = random_commensurate(rng, k, rows)
    slopes = g[:, None] * powers
    rho = exact_radius(torch.tensor(logits), torch.tensor(slopes)).numpy()
    ghost = nearest_ghost(torch.tensor(logits), torch.tensor(slopes)).numpy()
    for i in range(rows):
        zeros = commensurate_zeros(logits[i], powers[i], g[i])
        expected = np.abs(zeros).min()
        assert rho[i] == pytest.approx(expected, rel=1e-6), (i, logits[i], powers[i], g[i])
        assert ghost[i].imag > 0
        images = np.concatenate([zeros, zeros.conj()])
        assert np.abs(images - ghost[i]).min() <= 1e-6 * expected, (i, ghost[i], zeros)


def test_ghost_is_a_zero_of_f_and_has_radius_modulus():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((64, 9)) * 4.0
    slopes = rng.standard_normal((64, 9))
    ghost = nearest_ghost(torch.tensor(logits), torch.tensor(slopes)).numpy()
    rho = exact_radius(torch.tensor(logits), torch.tensor(slopes)).numpy()
    assert np.all(relative_residual_np(logits, slopes, ghost) < 1e-9)
    np.testing.assert_allclose(np.abs(ghost), rho, rtol=1e-7)
    assert np.all(ghost.imag > 0)


def test_radius_not_below_strip_bound_and_not_above_any_zero():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((200, 6)) * rng.uniform(0.0, 8.0, (200, 1))
    slopes = rng.standard_normal((200, 6)) * rng.uniform(0.1, 5.0, (200, 1))
    rho = exact_radius(torch.tensor(logits), torch.tensor(slopes))
    lower = math.pi / (slopes.max(axis=1) - slopes.min(axis=1))
    assert np.all(rho.numpy() >= lower * (1 - 1e-12))
    assert np.all(np.isfinite(rho.numpy()))


def test_binary_rows_equal_binary_radius():
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((50, 2)) * 6.0
    slopes = rng.standard_normal((50, 2)) * 3.0
    rho = exact_radius(torch.tensor(logits), torch.tensor(slopes))
    expected = binary_radius(torch.tensor(logits[:, 0] - logits[:, 1]), torch.tensor(slopes[:, 0] - slopes[:, 1]))
    assert torch.allclose(rho, expected, rtol=1e-7, atol=0.0)


def test_huge_margins_do_not_overflow():
    logits = torch.tensor([[0.0, 800.0], [0.0, -650.0]])
    slopes = torch.tensor([[0.0, 1e-3], [5.0, 0.0]])
    rho = exact_radius(logits, slopes)
    expected = [math.hypot(800.0, math.pi) / 1e-3, math.hypot(650.0, math.pi) / 5.0]
    assert torch.allclose(rho, torch.tensor(expected, dtype=torch.float64), rtol=1e-7)


def test_equal_weights_integer_slopes_roots_of_unity():
    # Σ_{k<K} s^k / K vanishes at s = e^{2πij/K}: nearest zero 2π/K for slopes 0..K-1.
    for k in (3, 7, 20):
        rho = exact_radius(torch.zeros(k), torch.arange(k, dtype=torch.float64))
        assert rho.item() == pytest.approx(2 * math.pi / k, rel=1e-8)


def test_large_k_row_is_certified_against_strip_bound_and_residual():
    rng = np.random.default_rng(5)
    logits, slopes = rng.standard_normal(1000) * 3.0, rng.standard_normal(1000)
    ghost = nearest_ghost(torch.tensor(logits), torch.tensor(slopes)).numpy()
    rho = exact_radius(torch.tensor(logits), torch.tensor(slopes)).item()
    assert rho >= math.pi / np.ptp(slopes)
    assert abs(abs(ghost) - rho) <= 1e-7 * rho
    assert relative_residual_np(logits, slopes, np.asarray(ghost)) < 1e-9


# ------------------------------------------------------------------------------------------- invariances

@pytest.fixture(scope="module")
def random_rows():
    rng = np.random.default_rng(21)
    logits = torch.tensor(rng.standard_normal((40, 7)) * 3.0)
    slopes = torch.tensor(rng.standard_normal((40, 7)))
    return logits, slopes, exact_radius(logits, slopes)


def test_invariant_to_shifting_slopes_and_logits(random_rows):
    logits, slopes, rho = random_rows
    assert torch.allclose(exact_radius(logits, slopes + 2.5), rho, rtol=1e-7)
    assert torch.allclose(exact_radius(logits - 7.0, slopes), rho, rtol=1e-7)


def test_sign_flip_mirrors_the_ghost(random_rows):
    logits, slopes, rho = random_rows
    assert torch.allclose(exact_radius(logits, -slopes), rho, rtol=1e-7)
    ghost, mirrored = nearest_ghost(logits, slopes), nearest_ghost(logits, -slopes)
    assert torch.allclose(mirrored.abs(), ghost.abs(), rtol=1e-7)


def test_scaling_slopes_scales_radius_inversely(random_rows):
    logits, slopes, rho = random_rows
    for c in (0.01, 3.0, 250.0):
        assert torch.allclose(exact_radius(logits, c * slopes), rho / c, rtol=1e-7)


def test_zero_spread_rows_have_no_ghost():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    slopes = torch.tensor([[0.7, 0.7, 0.7], [0.0, 1.0, 2.0]])
    rho, ghost = exact_radius(logits, slopes), nearest_ghost(logits, slopes)
    assert math.isinf(rho[0].item()) and math.isfinite(rho[1].item())
    assert math.isnan(ghost[0].real.item()) and math.isnan(ghost[0].imag.item())
    assert ghost.dtype == torch.complex128


def test_batched_leading_dims_match_flat_rows():
    rng = np.random.default_rng(9)
    logits = torch.tensor(rng.standard_normal((3, 4, 5)) * 2.0, dtype=torch.float32)
    slopes = torch.tensor(rng.standard_normal((3, 4, 5)), dtype=torch.float32)
    rho = exact_radius(logits, slopes)
    assert rho.shape == (3, 4) and rho.dtype == torch.float64
    assert nearest_ghost(logits, slopes).shape == (3, 4)
    flat = exact_radius(logits.reshape(12, 5), slopes.reshape(12, 5))
    assert torch.allclose(rho.reshape(12), flat, rtol=1e-9)
    single = exact_radius(logits[1, 2], slopes[1, 2])
    assert single.shape == () and single.item() == pytest.approx(rho[1, 2].item(), rel=1e-9)


# ------------------------------------------------------------------------------------------ branch and bound

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_min_exact_radius_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    logits = torch.tensor(rng.standard_normal((6, 20, 8)) * rng.uniform(0.5, 5.0))
    slopes = torch.tensor(rng.standard_normal((6, 20, 8)) * rng.uniform(0.3, 1.0, (6, 20, 1)))
    brute = exact_radius(logits, slopes).reshape(-1)
    value, index = min_exact_radius(logits, slopes)
    assert value.item() == pytest.approx(brute.min().item(), rel=1e-7)
    assert brute[index].item() == pytest.approx(brute.min().item(), rel=1e-7)


def test_min_exact_radius_all_flat_rows():
    value, index = min_exact_radius(torch.zeros(4, 3), torch.ones(4, 3))
    assert math.isinf(value.item()) and index == 0


# ------------------------------------------------------------------------------------------------ validation

@pytest.mark.parametrize(
    "logits, slopes, message",
    [
        (torch.zeros(4, 3), torch.zeros(4, 2), "shape"),
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2), "NaN"),
        (torch.zeros(1, 2), torch.tensor([[0.0, float("inf")]]), "inf"),
        (torch.zeros(3, 1), torch.zeros(3, 1), "K >= 2"),
        (torch.tensor(1.0), torch.tensor(1.0), "scalar"),
    ],
)
def test_invalid_input_raises(logits, slopes, message):
    for fn in (exact_radius, nearest_ghost, min_exact_radius):
        with pytest.raises(ValueError, match=message):
            fn(logits, slopes)


@pytest.mark.parametrize("rtol", [0.0, -1e-3, 0.5, 1e-15])
def test_invalid_rtol_raises(rtol):
    with pytest.raises(ValueError, match="rtol"):
        exact_radius(torch.zeros(2), torch.tensor([0.0, 1.0]), rtol=rtol)


# --------------------------------------------------------------------------- certification and its fallback

@pytest.mark.parametrize("proposal", ["none", "far zero"])
def test_fallback_finds_nearest_zero_when_newton_proposal_is_missing_or_wrong(monkeypatch, proposal):
    import safestep.geometry.radius as radius_module

    def far_or_missing(logw, b):
        if proposal == "none":
            return torch.full((len(logw),), complex(math.nan, math.nan), dtype=torch.complex128)
        far_start = torch.full((len(logw), 1), complex(0.0, 40.0), dtype=torch.complex128)
        return radius_module._newton_from(logw, b, far_start)

    monkeypatch.setattr(radius_module, "_newton_candidates", far_or_missing)
    rng = np.random.default_rng(42)
    logits, powers, g = random_commensurate(rng, 5, 12)
    slopes = g[:, None] * powers
    rho = exact_radius(torch.tensor(logits), torch.tensor(slopes)).numpy()
    ghost = nearest_ghost(torch.tensor(logits), torch.tensor(slopes)).numpy()
    for i in range(len(rho)):
        zeros = commensurate_zeros(logits[i], powers[i], g[i])
        assert rho[i] == pytest.approx(np.abs(zeros).min(), rel=1e-6)
        if not np.isnan(ghost[i]):
            assert abs(abs(ghost[i]) - rho[i]) <= 1e-6 * rho[i]
    assert np.isfinite(ghost).mean() > 0.5  # the location is usually recovered too
