"""Tests of safestep.geometry.weighted against numpy.roots, exact_radius, brute force and the K = 2 closed form.

Every comparison is one-sided where the bound is a bound (R_w ≤ ρ*) and each family also checks that the bound comes
within 1 % of ρ* on some rows, so a bound scaled by 1.01 fails the one-sided check.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safestep.geometry.radius import exact_radius, min_exact_radius
from safestep.geometry.weighted import (
    min_weighted_radius,
    weighted_excludes,
    weighted_radius,
)

SAFE = 1 - 1e-9  # exact_radius is certified to rtol 1e-8 from above: (1 − 1e-8)·r ≤ ρ* ≤ r


def softmax_np(logits: np.ndarray) -> np.ndarray:
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def commensurate_radius(logits: np.ndarray, powers: np.ndarray, g: float) -> float:
    """ρ* of Σ_k w_k e^{g m_k t} = P(e^{g t}) from the roots of the polynomial P (principal logs)."""
    coeffs = np.zeros(powers.max() - powers.min() + 1)
    np.add.at(coeffs, powers - powers.min(), softmax_np(logits))
    return float(np.abs(np.log(np.roots(coeffs[::-1]).astype(complex))).min() / g)


def lm_rows(rows: int, k: int, seed: int, rare: float = 0.05, extreme: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """LM-like rows: Zipf probabilities (random rank order), Gaussian slopes, ±3..extreme σ on the rarest classes."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(rows, k, generator=g), dim=1).double() + 1
    logits = -1.1 * torch.log(ranks) + 0.3 * torch.randn(rows, k, generator=g, dtype=torch.float64)
    slopes = torch.randn(rows, k, generator=g, dtype=torch.float64) + 2 * torch.randn(rows, 1, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(rows, k, generator=g) < 0.5, -1.0, 1.0).double()
    tail = sign * (3 + (extreme - 3) * torch.rand(rows, k, generator=g, dtype=torch.float64))
    slopes = torch.where(ranks > (1 - rare) * k, tail + slopes.mean(dim=1, keepdim=True), slopes)
    return logits, slopes


def spread_np(slopes: np.ndarray) -> np.ndarray:
    return slopes.max(axis=-1) - slopes.min(axis=-1)


# ------------------------------------------------------------------------------------- polynomial roots

def test_below_polynomial_roots_on_thousands_of_commensurate_rows():
    rng = np.random.default_rng(17)
    found = []
    for k in range(2, 13):
        rows = 160
        logits = rng.standard_normal((rows, k)) * rng.uniform(0.0, 8.0, (rows, 1))
        powers = rng.integers(0, 9, (rows, k))
        flat = powers.max(axis=1) == powers.min(axis=1)
        powers[flat, 0] = powers[flat, 1] + 1
        g = rng.uniform(0.1, 3.0, rows)
        bound = weighted_radius(torch.tensor(logits), torch.tensor(g[:, None] * powers)).numpy()
        exact = np.array([commensurate_radius(logits[i], powers[i], g[i]) for i in range(rows)])
        assert np.all(bound <= exact * (1 + 1e-9)), (k, np.max(bound / exact))
        assert np.all(bound >= math.pi / (g * spread_np(powers)) * (1 - 1e-12))
        found.append(bound / exact)
    ratios = np.concatenate(found)
    assert ratios.size == 1760 and np.sum(ratios > 0.99) >= 50  # tight rows exist: a 1.01 scaling fails above


# --------------------------------------------------------------------------------------------- K = 2

def test_two_classes_equal_the_closed_form():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((500, 2)) * rng.uniform(0.0, 20.0, (500, 1))
    slopes = rng.standard_normal((500, 2)) * rng.uniform(0.01, 5.0, (500, 1))
    expected = np.hypot(logits[:, 0] - logits[:, 1], math.pi) / np.abs(slopes[:, 0] - slopes[:, 1])
    bound = weighted_radius(torch.tensor(logits), torch.tensor(slopes)).numpy()
    np.testing.assert_allclose(bound, expected, rtol=1e-13, atol=0)


def test_two_live_classes_among_masked_ones_equal_the_closed_form():
    rng = np.random.default_rng(6)
    logits = np.full((50, 7), -np.inf)
    slopes = np.full((50, 7), np.nan)  # masked slopes may hold anything
    cols = np.stack([rng.choice(7, 2, replace=False) for _ in range(50)])
    rows = np.arange(50)[:, None]
    logits[rows, cols] = rng.standard_normal((50, 2)) * 5
    slopes[rows, cols] = rng.standard_normal((50, 2))
    pair_z, pair_a = logits[rows, cols], slopes[rows, cols]
    expected = np.hypot(pair_z[:, 0] - pair_z[:, 1], math.pi) / np.abs(pair_a[:, 0] - pair_a[:, 1])
    np.testing.assert_allclose(weighted_radius(torch.tensor(logits), torch.tensor(slopes)).numpy(), expected, rtol=1e-13)


# ------------------------------------------------------------------------------------ against exact_radius

def test_gaussian_rows_below_exact_and_tight_somewhere():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(600, 3, generator=g, dtype=torch.float64) * 3
    slopes = torch.randn(600, 3, generator=g, dtype=torch.float64)
    ratio = weighted_radius(logits, slopes) / exact_radius(logits, slopes)
    assert bool((ratio <= 1 / SAFE).all()), float(ratio.max())
    assert float(ratio.max()) > 0.995 and float(ratio.median()) > 0.9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lm_rows_k256_below_exact_and_well_above_pi_over_spread(dtype):
    logits, slopes = lm_rows(80, 256, seed=3)
    logits, slopes = logits.to(dtype), slopes.to(dtype)  # the float32 values, taken exactly, are the problem
    exact = exact_radius(logits.double(), slopes.double())
    bound = weighted_radius(logits, slopes)
    ratio = bound / exact
    assert bool((ratio <= SAFE ** -1).all()), float(ratio.max())
    assert float(ratio.median()) > 0.7 and float(ratio.min()) > 0.5
    assert float((bound.numpy() * spread_np(slopes.double().numpy()) / math.pi).min()) > 2.5


def test_lm_rows_k8192_below_exact():
    logits, slopes = lm_rows(3, 8192, seed=4)
    ratio = weighted_radius(logits.float(), slopes.float()) / exact_radius(logits.float(), slopes.float())
    assert bool((ratio <= 1 / SAFE).all()) and float(ratio.min()) > 0.6, ratio


def test_rows_dominated_by_the_extreme_pair_are_tight():
    """Two equally likely classes at the extreme slopes plus a faint tail: ρ* ≈ π/Δ_a and R_w within 1 % of it."""
    logits, slopes = lm_rows(40, 256, seed=8)
    logits[:, :2] = 20.0
    slopes[:, 2:] = slopes[:, 2:].clamp(-3, 3) / 4
    slopes[:, 0], slopes[:, 1] = 1.0, -1.0
    ratio = weighted_radius(logits, slopes) / exact_radius(logits, slopes)
    assert bool((ratio <= 1 / SAFE).all()) and float(ratio.min()) > 0.99, ratio


def test_brute_force_no_small_modulus_inside_the_disk():
    """|F(t)| over a polar grid filling |t| ≤ R_w stays away from 0 (relative to Σ|terms|), by plain numpy."""
    logits, slopes = lm_rows(20, 64, seed=9)
    bound = weighted_radius(logits, slopes).numpy()
    radius, angle = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, math.pi, 121))
    for i in range(20):
        t = (radius * np.exp(1j * angle)).ravel() * bound[i]
        terms = softmax_np(logits[i].numpy())[None, :] * np.exp(slopes[i].numpy()[None, :] * t[:, None])
        assert (np.abs(terms.sum(axis=1)) / np.abs(terms).sum(axis=1)).min() > 1e-3


# ------------------------------------------------------------------------------------------ real inputs

def test_masked_classes_drop_out():
    logits, slopes = lm_rows(30, 40, seed=10)
    dead = torch.rand(30, 40, generator=torch.Generator().manual_seed(1)) < 0.3
    dead[:, 0] = False
    masked_z = logits.masked_fill(dead, -math.inf)
    masked_a = slopes.masked_fill(dead, math.nan)
    bound = weighted_radius(masked_z, masked_a)
    exact = exact_radius(masked_z, masked_a)
    live_spread = slopes.masked_fill(dead, -math.inf).amax(1) - slopes.masked_fill(dead, math.inf).amin(1)
    assert bool((bound <= exact / SAFE).all()) and bool((bound >= math.pi / live_spread * (1 - 1e-12)).all())
    for i in range(30):  # the same row with its masked classes removed gives the same bound
        keep = ~dead[i]
        alone = weighted_radius(logits[i, keep][None], slopes[i, keep][None])
        assert torch.allclose(bound[i], alone[0], rtol=2e-3)


def test_special_rows():
    logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0.0, math.nan, 1.0], [0.0, math.inf, 1.0],
                           [0.0, -math.inf, -math.inf], [0.0, 1.0, 2.0]])
    slopes = torch.tensor([[1.0, 1.0, 1.0], [0.0, math.inf, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0],
                           [0.0, math.nan, 5.0], [0.0, math.nan, 1.0]])
    r = weighted_radius(logits, slopes)
    assert math.isinf(r[0]) and math.isinf(r[4])  # Δ_a = 0 over the live classes
    assert bool(torch.isnan(r[[1, 2, 3, 5]]).all())
    assert r.dtype == torch.float64 and weighted_radius(logits.reshape(2, 3, 3), slopes.reshape(2, 3, 3)).shape == (2, 3)
    with pytest.raises(ValueError):
        weighted_radius(torch.zeros(3, 4), torch.zeros(3, 5))


def test_chunking_and_bucket_count_only_tighten_or_match():
    logits, slopes = lm_rows(64, 300, seed=11)
    whole = weighted_radius(logits, slopes)
    assert torch.equal(whole, weighted_radius(logits, slopes, chunk=1000))  # rows are independent
    fine = weighted_radius(logits, slopes, buckets=512)
    exact = exact_radius(logits, slopes)
    assert bool((fine <= exact / SAFE).all()) and float((fine / whole).median()) >= 1.0


def test_excludes_agrees_with_exact_radii():
    logits, slopes = lm_rows(200, 128, seed=12)
    exact = exact_radius(logits, slopes)
    bound = weighted_radius(logits, slopes)
    level = float(exact.quantile(0.2))
    excluded = weighted_excludes(logits, slopes, level)
    assert not bool(excluded[exact <= level].any())  # never excludes a row that binds at this level
    assert bool(excluded[bound > level * 1.01].all())  # and excludes what the bound certifies beyond it


# ------------------------------------------------------------------------------------------ batch minima

def test_min_weighted_radius_is_the_minimum_of_the_row_bounds():
    logits, slopes = lm_rows(300, 64, seed=13)
    rows = weighted_radius(logits, slopes)
    value, index = min_weighted_radius(logits, slopes, chunk=64 * 37)  # several chunks
    assert float(value) == float(rows.min()) and float(rows[index]) == float(value)  # the same grid search, exactly
    assert float(value) <= float(exact_radius(logits, slopes).min()) / SAFE
    nan_rows = slopes.clone()
    nan_rows[7, 3] = math.nan
    value, index = min_weighted_radius(logits, nan_rows)
    assert math.isnan(value) and index == 7


def test_min_exact_radius_on_lm_rows_equals_the_minimum_of_exact_radius():
    logits, slopes = lm_rows(160, 96, seed=14)
    logits[::3] *= 3  # rows of different confidence, so that few rows can bind
    exact = exact_radius(logits, slopes)
    value, index = min_exact_radius(logits.float().double(), slopes)
    assert float(value) == pytest.approx(float(exact.min()), rel=1e-7)
    assert float(exact[index]) == pytest.approx(float(exact.min()), rel=1e-7)


def test_min_exact_radius_memory_chunks_do_not_change_the_result(monkeypatch):
    import safestep.geometry.radius as radius_module

    logits, slopes = lm_rows(12, 200, seed=15)
    expected = min_exact_radius(logits, slopes)
    monkeypatch.setattr(radius_module, "_CHUNK_ELEMENTS", 200 * 3)  # three points per evaluation chunk
    value, index = min_exact_radius(logits, slopes)
    assert index == expected[1] and float(value) == pytest.approx(float(expected[0]), rel=1e-9)


# ------------------------------------------------------------------------------------------ larger sweeps

@pytest.mark.slow
@pytest.mark.parametrize("k, rows", [(256, 1000), (2048, 40), (8192, 16)])
def test_lm_rows_sweep_below_exact(k, rows):
    logits, slopes = lm_rows(rows, k, seed=100 + k)
    logits = logits * torch.linspace(0.5, 3.0, rows, dtype=torch.float64)[:, None]  # confident and flat rows
    logits, slopes = logits.float(), slopes.float()
    ratio = weighted_radius(logits, slopes) / exact_radius(logits, slopes)
    assert bool((ratio <= 1 / SAFE).all()), float(ratio.max())
    assert float(ratio.median()) > 0.6


@pytest.mark.slow
def test_min_exact_radius_k8192_bounded_and_equal_to_the_row_minimum():
    logits, slopes = lm_rows(12, 8192, seed=21)
    logits = logits * torch.linspace(0.5, 3.0, 12, dtype=torch.float64)[:, None]
    value, index = min_exact_radius(logits.float(), slopes.float())
    exact = exact_radius(logits.float(), slopes.float())
    assert float(value) == pytest.approx(float(exact.min()), rel=1e-7) and index == int(exact.argmin())
