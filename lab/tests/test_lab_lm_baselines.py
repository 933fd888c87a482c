"""The LM experiments' spike defences against hand computations: the z-score clipper and the loss-spike skipper."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from safestep_lab.lm_baselines import LossSpikeSkipper, ZScoreClipper, grad_norm


def _params(*grads: list[float]) -> list[nn.Parameter]:
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros(len(g), dtype=torch.float64))
        p.grad = torch.tensor(g, dtype=torch.float64)
        params.append(p)
    return params


def test_grad_norm_is_the_global_l2_norm():
    assert grad_norm(_params([3.0], [4.0, 0.0])) == pytest.approx(5.0)
    assert grad_norm([nn.Parameter(torch.zeros(2))]) == 0.0


def test_zscore_clipper_warms_up_then_clips_to_mean_plus_z_std():
    clipper = ZScoreClipper(z=2.0, alpha=0.5, warmup=3)
    for norm in (1.0, 2.0, 3.0):  # warm-up: never clipped; mean 2, population variance 2/3
        assert clipper(_params([norm])) == 1.0
    assert clipper.mean == pytest.approx(2.0) and clipper.var == pytest.approx(2.0 / 3.0)
    limit = 2.0 + 2.0 * math.sqrt(2.0 / 3.0)
    assert clipper.threshold == pytest.approx(limit)
    params = _params([30.0, 40.0])  # norm 50 → scaled to the limit
    factor = clipper(params)
    assert factor == pytest.approx(limit / 50.0) and grad_norm(params) == pytest.approx(limit)
    assert clipper.clipped == 1
    # the EMA is updated with the clipped norm, not with 50
    delta = limit - 2.0
    assert clipper.mean == pytest.approx(2.0 + 0.5 * delta)
    assert clipper.var == pytest.approx(0.5 * (2.0 / 3.0 + 0.5 * delta * delta))
    small = _params([0.5])
    assert clipper(small) == 1.0 and small[0].grad.item() == 0.5


def test_zscore_clipper_leaves_nonfinite_gradients_alone_and_checks_arguments():
    clipper = ZScoreClipper(warmup=1)
    clipper(_params([1.0]))
    params = _params([math.inf])
    assert clipper(params) == 1.0 and math.isinf(params[0].grad.item()) and clipper.seen == 1
    for bad in ({"z": 0.0}, {"alpha": 1.0}, {"warmup": 0}):
        with pytest.raises(ValueError):
            ZScoreClipper(**bad)


def test_loss_skipper_skips_spikes_and_accepts_a_new_level_after_patience():
    skipper = LossSpikeSkipper(factor=1.5, alpha=0.5, warmup=2, patience=3)
    assert not skipper.should_skip(4.0) and not skipper.should_skip(2.0)  # warm-up: mean 3
    assert skipper.ema == pytest.approx(3.0)
    assert not skipper.should_skip(4.4)  # 4.4 < 1.5·3 = 4.5: accepted, EMA 3.7
    assert skipper.ema == pytest.approx(3.7)
    assert [skipper.should_skip(10.0) for _ in range(3)] == [True, True, True]  # 10 > 5.55: skipped thrice
    assert skipper.ema == pytest.approx(3.7) and skipper.skipped == 3
    assert not skipper.should_skip(10.0)  # patience exhausted: the new level is accepted
    assert skipper.ema == pytest.approx(10.0) and skipper.streak == 0
    assert skipper.should_skip(math.nan) and skipper.skipped == 4
    with pytest.raises(ValueError):
        LossSpikeSkipper(factor=1.0)
