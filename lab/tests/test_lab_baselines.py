"""AGC against hand-computed numbers, and the paper code's gradient-direction controller against a closed form."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from safestep_lab.baselines import GradientDirectionController, adaptive_grad_clip_, unitwise_norm
from safestep_lab.data import Split
from safestep_lab.training import adaptive_clipped, gradient_direction, train


def _param(value, grad) -> nn.Parameter:
    p = nn.Parameter(torch.tensor(value, dtype=torch.float64))
    p.grad = torch.tensor(grad, dtype=torch.float64)
    return p


def test_agc_matches_a_hand_computation():
    # rows: ‖W0‖ = 5 → limit 0.05, ‖G0‖ = 1 → G0 scaled to 0.05; ‖W1‖ = 1e-4 < eps → limit 0.01·1e-3 = 1e-5,
    # ‖G1‖ = 2 → [0, 1e-5]; ‖W2‖ = 1 → limit 0.01 > ‖G2‖ = 0.001 → unchanged.
    weight = _param([[3.0, 4.0], [0.0, 1e-4], [1.0, 0.0]], [[1.0, 0.0], [0.0, 2.0], [0.001, 0.0]])
    # a vector is one unit: ‖b‖ = 0 → limit 1e-5; ‖g_b‖ = 5e-5 → g_b · 0.2
    bias = _param([0.0, 0.0], [3e-5, 4e-5])
    adaptive_grad_clip_([weight, bias], clip_factor=0.01, eps=1e-3)
    np.testing.assert_allclose(weight.grad.numpy(), [[0.05, 0.0], [0.0, 1e-5], [0.001, 0.0]], rtol=1e-12)
    np.testing.assert_allclose(bias.grad.numpy(), [6e-6, 8e-6], rtol=1e-12)


def test_agc_on_a_conv_kernel_clips_each_output_channel_by_its_own_norm():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) * torch.tensor([1e-4, 1.0, 1e-4, 1.0]).view(4, 1, 1).double()
    p = _param(w.tolist(), g.tolist())
    adaptive_grad_clip_([p], clip_factor=0.01)
    for i in range(4):  # brute force, channel by channel
        w_norm, g_norm = math.sqrt(float((w[i] ** 2).sum())), math.sqrt(float((g[i] ** 2).sum()))
        limit = 0.01 * max(w_norm, 1e-3)
        expected = g[i] * (limit / g_norm if g_norm > limit else 1.0)
        np.testing.assert_allclose(p.grad[i].numpy(), expected.numpy(), rtol=1e-12)
    assert unitwise_norm(w).shape == (4, 1, 1)


def test_agc_rejects_bad_settings():
    p = _param([1.0], [1.0])
    with pytest.raises(ValueError, match="clip_factor"):
        adaptive_grad_clip_([p], clip_factor=0.0)
    with pytest.raises(ValueError, match="eps"):
        adaptive_grad_clip_([p], eps=-1.0)


def _linear_problem():
    """A float64 linear model z = Wx + b on random data and its closed-form CE gradient and radius along −g."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (40,), generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    W, b = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    X, Y = x.numpy(), np.eye(4)[y.numpy()]
    z = X @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - Y) / len(X)
    gW, gb = dz.T @ X, dz.sum(0)
    g_norm = math.sqrt((gW**2).sum() + (gb**2).sum())
    slopes = X @ (-gW / g_norm).T + (-gb / g_norm)
    rho = math.pi / (slopes.max(1) - slopes.min(1)).max()
    return model, x, y, (W, b), (gW, gb), g_norm, rho


@pytest.mark.parametrize("lr_in_radii", [10.0, 0.5])
def test_grad_proxy_controller_matches_the_closed_form_on_a_linear_model(lr_in_radii):
    model, x, y, (W, b), (gW, gb), g_norm, rho = _linear_problem()
    lr = lr_in_radii * rho / g_norm  # the SGD proxy τ = lr·‖g‖ is lr_in_radii·ρ
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    nn.functional.cross_entropy(model(x), y).backward()
    record = GradientDirectionController(model, method="jvp").step(optimizer, x)
    assert record.tau == pytest.approx(lr * g_norm, rel=1e-10)
    assert record.rho == pytest.approx(rho, rel=1e-8)
    assert record.r_proposed == pytest.approx(lr_in_radii, rel=1e-8)
    lr_eff = min(lr, rho / g_norm)
    assert record.scale == pytest.approx(lr_eff / lr, rel=1e-8)
    assert record.r_applied == pytest.approx(min(lr_in_radii, 1.0), rel=1e-8)
    np.testing.assert_allclose(model.weight.detach().numpy(), W - lr_eff * gW, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.bias.detach().numpy(), b - lr_eff * gb, rtol=1e-9, atol=1e-12)
    assert optimizer.param_groups[0]["lr"] == lr  # the LR is restored after the step


def test_grad_proxy_guard_in_train_records_the_controller_and_rejects_monitor():
    model, x, y, _, _, g_norm, rho = _linear_problem()
    data = Split(x.float(), y, x.float(), y, n_classes=4)
    model.float()
    result = train(model, lambda p: torch.optim.Adam(p, lr=100.0), data, steps=3, batch_size=40,
                   rule=gradient_direction())
    assert all(s.tau is not None and s.rho > 0 and s.scale <= 1.0 for s in result.steps)
    assert 100.0 * g_norm > rho  # the proxy step is far outside the radius, so the first step is scaled to ρ/(lr‖g‖)
    assert result.steps[0].scale == pytest.approx(rho / (100.0 * g_norm), rel=1e-4)
    assert result.steps[0].tau == pytest.approx(100.0 * g_norm, rel=1e-4)


def test_agc_guard_in_train_equals_clipping_by_hand_then_stepping():
    model, x, y, *_ = _linear_problem()
    data = Split(x.float(), y, x.float(), y, n_classes=4)
    model.float()
    twin = nn.Linear(6, 4)
    twin.load_state_dict(model.state_dict())
    train(model, lambda p: torch.optim.SGD(p, lr=0.3), data, steps=1, batch_size=40,
          rule=adaptive_clipped(clip_factor=0.01))
    nn.functional.cross_entropy(twin(x.float()), y).backward()  # one full batch: the row order does not matter
    with torch.no_grad():
        for p in twin.parameters():
            w_units = p.norm(dim=1, keepdim=True) if p.ndim == 2 else p.norm()
            g_units = p.grad.norm(dim=1, keepdim=True) if p.ndim == 2 else p.grad.norm()
            limit = 0.01 * w_units.clamp_min(1e-3)
            p -= 0.3 * p.grad * torch.where(g_units > limit, limit / g_units, torch.ones_like(g_units))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
