"""Masked classes (−inf logits) in the geometry layer: every radius and cap equals the one computed on the live
columns alone, checked against numpy.roots; invalid rows raise ValueError; the hot-path ``row_spread`` contract."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from safestep.geometry import belief_step_cap, exact_radius, min_exact_radius, nearest_ghost, radius_lower_bound, spread
from safestep.geometry.radius import row_spread
from safestep.geometry.simplex import RULES

f64 = torch.float64
INF, NAN = math.inf, math.nan
GARBAGE = torch.tensor([NAN, INF, -INF, 1e300, -7.0], dtype=f64)  # what a finite difference leaves at masked classes


def masked_rows(n: int, k: int, seed: int, logit_scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits and slopes with a random non-empty live set per row; masked logits −inf, masked slopes garbage."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=f64) * logit_scale
    slopes = torch.randn(n, k, generator=g, dtype=f64)
    live = torch.rand(n, k, generator=g) < torch.rand(n, 1, generator=g)
    live[torch.arange(n), torch.randint(0, k, (n,), generator=g)] = True
    garbage = GARBAGE[torch.randint(0, len(GARBAGE), (n, k), generator=g)]
    return torch.where(live, logits, -INF), torch.where(live, slopes, garbage), live


def test_exact_radius_with_masked_classes_equals_the_live_columns_alone():
    logits, slopes, live = masked_rows(60, 7, seed=0)
    rho, ghost = exact_radius(logits, slopes), nearest_ghost(logits, slopes)
    for i in range(len(logits)):
        z, a = logits[i, live[i]], slopes[i, live[i]]
        if live[i].sum() == 1 or a.max() == a.min():
            assert rho[i].item() == INF and math.isnan(ghost[i].real.item())
            continue
        assert rho[i].item() == pytest.approx(exact_radius(z, a).item(), rel=1e-9)
        assert abs(ghost[i] - nearest_ghost(z, a)).item() <= 1e-7 * rho[i].item()
    assert (live.sum(-1) == 1).any() and (live.sum(-1) >= 3).any()  # both kinds of row were exercised


def test_masked_radius_against_polynomial_roots():
    """Commensurate live slopes a_k = g·m_k: F is the polynomial Σ_live w_k s^{m_k} in s = e^{gt} (numpy.roots)."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        k = int(rng.integers(3, 10))
        live = rng.random(k) < 0.6
        live[rng.choice(k, 2, replace=False)] = True
        logits = np.where(live, rng.standard_normal(k) * rng.uniform(0, 6), -np.inf)
        powers = rng.integers(0, 8, k)
        powers[np.flatnonzero(live)[:2]] = [0, 1]  # keep Δ_a > 0 on the live set
        g = rng.uniform(0.2, 3.0)
        slopes = np.where(live, g * powers, np.nan)
        w = np.exp(logits[live] - logits[live].max())
        coeffs = np.zeros(powers[live].max() + 1)
        np.add.at(coeffs, powers[live], w / w.sum())
        expected = np.abs(np.log(np.roots(coeffs[::-1]).astype(complex))).min() / g
        assert exact_radius(torch.tensor(logits), torch.tensor(slopes)).item() == pytest.approx(expected, rel=1e-6)


def test_min_exact_radius_with_masked_classes_is_the_min_over_live_rows():
    logits, slopes, live = masked_rows(48, 6, seed=2)
    per_row = torch.stack([exact_radius(logits[i, live[i]], slopes[i, live[i]]) if live[i].sum() > 1
                           else torch.tensor(INF, dtype=f64) for i in range(len(logits))])
    value, index = min_exact_radius(logits.reshape(4, 12, 6), slopes.reshape(4, 12, 6))
    assert value.item() == pytest.approx(per_row.min().item(), rel=1e-8)
    assert per_row[index].item() == pytest.approx(per_row.min().item(), rel=1e-8)


def test_spread_and_lower_bound_over_live_classes():
    _, slopes, live = masked_rows(30, 9, seed=3)
    expected = torch.stack([slopes[i, live[i]].max() - slopes[i, live[i]].min() for i in range(30)])
    assert torch.equal(spread(slopes, live=live), expected)
    lower = radius_lower_bound(slopes, live=live)
    assert torch.equal(lower, torch.where(expected > 0, math.pi / expected, INF))
    shared = torch.tensor([True, False, True], dtype=torch.bool)  # one mask broadcast over every row
    a = torch.tensor([[1.0, NAN, 4.0], [2.0, INF, -1.0]], dtype=f64)
    assert torch.equal(spread(a, live=shared), torch.tensor([3.0, 3.0], dtype=f64))


@pytest.mark.parametrize(
    "logits, slopes, message",
    [
        ([[-INF, -INF, -INF]], [[0.0, 1.0, 2.0]], "no live class"),
        ([[0.0, INF, 1.0]], [[0.0, 1.0, 2.0]], r"\+inf"),
        ([[0.0, NAN, 1.0]], [[0.0, 1.0, 2.0]], "NaN"),
        ([[0.0, -INF, 1.0]], [[NAN, 1.0, 2.0]], "live"),
        ([[0.0, -INF, 1.0]], [[0.0, 1.0, INF]], "live"),
    ],
)
def test_invalid_masked_rows_raise(logits, slopes, message):
    z, a = torch.tensor(logits, dtype=f64), torch.tensor(slopes, dtype=f64)
    for call in (exact_radius, nearest_ghost, min_exact_radius, belief_step_cap):
        with pytest.raises(ValueError, match=message):
            call(z, a)


def test_invalid_live_masks_raise():
    a = torch.tensor([[0.0, 1.0, 2.0]], dtype=f64)
    with pytest.raises(ValueError, match="bool"):
        spread(a, live=torch.tensor([[1, 0, 1]]))
    with pytest.raises(ValueError, match="broadcast"):
        spread(a, live=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="no live class"):
        radius_lower_bound(a, live=torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="live"):
        spread(torch.tensor([[0.0, NAN, 2.0]], dtype=f64), live=torch.tensor([True, True, False]))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_belief_cap_with_masked_classes_equals_the_live_columns_alone(rule, smoothing):
    logits, slopes, live = masked_rows(40, 8, seed=4, logit_scale=2.0)
    g = torch.Generator().manual_seed(5)
    pick = lambda row: torch.nonzero(row)[torch.randint(0, int(row.sum()), (1,), generator=g)][0, 0]
    labels = torch.stack([pick(row) for row in live])
    for with_labels in (True, False):
        y = labels if with_labels else None
        cap = belief_step_cap(logits, slopes, y, rule=rule, smoothing=smoothing)
        for i in range(len(logits)):
            if live[i].sum() == 1:
                assert cap[i].item() == INF
                continue
            z, a = logits[i, live[i]], slopes[i, live[i]]
            label = None if y is None else torch.nonzero(torch.nonzero(live[i])[:, 0] == y[i])[0, 0]
            alone = belief_step_cap(z, a, label, rule=rule, smoothing=smoothing)
            assert cap[i].item() == pytest.approx(alone.item(), rel=1e-9), (i, rule, with_labels)


def test_belief_cap_rejects_a_label_on_a_masked_class():
    z = torch.tensor([[0.0, -INF, 1.0]], dtype=f64)
    with pytest.raises(ValueError, match="masked"):
        belief_step_cap(z, torch.zeros(1, 3, dtype=f64), torch.tensor([1]))


# ------------------------------------------------------------------------------------------- row_spread

def test_row_spread_values_and_signals():
    a = torch.tensor([[1.0, 5.0, -2.0], [1.0, NAN, 2.0], [1.0, INF, 2.0], [-INF, INF, 0.0], [INF, INF, INF]])
    assert torch.equal(row_spread(a[:1]), torch.tensor([7.0], dtype=f64))
    out = row_spread(a)
    assert out.dtype == f64 and math.isnan(out[1]) and out[2].item() == INF and math.isnan(out[4])
    assert out[3].item() == INF
    live = torch.tensor([[True, True, False], [True, False, True], [True, False, True], [False, False, True],
                         [False, False, False]])
    masked = row_spread(a, live)
    assert masked[:3].tolist() == [4.0, 1.0, 1.0] and masked[3].item() == 0.0
    assert masked[4].item() == -INF  # no live class: non-finite
    assert torch.equal(row_spread(a[:1], torch.tensor([True, False, True])), torch.tensor([3.0], dtype=f64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_row_spread_subtracts_in_float64(dtype):
    top, bottom = 256.0, -2.0**-8  # both exact in bf16/fp16/fp32; their difference is not representable in bf16/fp16
    a = torch.tensor([[top, 0.0, bottom]], dtype=dtype)
    assert row_spread(a).item() == top - bottom
    assert row_spread(a, torch.tensor([[True, False, True]])).item() == top - bottom
    logits, slopes, live = masked_rows(20, 6, seed=6)
    low = slopes.to(dtype)
    assert torch.equal(row_spread(low, live), spread(low.to(f64), live=live))


class _OpLog(TorchDispatchMode):
    """Records every aten op with the numel of its outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        numel, dtype = (first.numel(), first.dtype) if isinstance(first, torch.Tensor) else (0, None)
        self.ops.append((str(func.overloadpacket.__name__), numel, dtype))
        return out


def test_row_spread_is_lean():
    """Two reductions in the input dtype, no full-size float64 copy, no finiteness scan, no host read."""
    slopes = torch.randn(4, 16, 1000, dtype=torch.bfloat16)
    with _OpLog() as log:
        row_spread(slopes)
    names = [name for name, _, _ in log.ops]
    assert sorted(n for n in names if n in ("amax", "amin", "max", "min", "aminmax")) == ["amax", "amin"]
    assert all(numel <= 4 * 16 for _, numel, _ in log.ops)  # nothing as large as the input is produced
    live = torch.rand(4, 16, 1000) > 0.1
    with _OpLog() as log:
        row_spread(slopes, live)
    names = [name for name, _, _ in log.ops]
    assert not {"_local_scalar_dense", "isfinite", "isnan", "nonzero", "item"} & set(names)
    assert all(dtype != f64 for _, numel, dtype in log.ops if numel > 4 * 16)
