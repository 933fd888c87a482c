"""The lab's line-sweep helpers, checked on a linear model whose gradient, slopes and line loss are closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safestep_lab.data import Split
from safestep_lab.models import CNNBatchNorm, Linear
from safestep_lab.sweeps import (
    TemperatureScaled, descent_direction, finite_stats, first_crossing, format_stats, line_sweep, logit_radius,
    random_direction, recalibrate_batch_norm, train_classifier, unit_direction,
)


@pytest.fixture()
def linear_case():
    """A random 5-feature, 4-class linear model, 30 samples and a random unit direction (V, v_b)."""
    gen = torch.Generator().manual_seed(3)
    model = Linear(in_features=5, n_classes=4)
    with torch.no_grad():
        model.fc.weight.copy_(torch.randn(4, 5, generator=gen))
        model.fc.bias.copy_(torch.randn(4, generator=gen))
    x = torch.randn(30, 5, generator=gen)
    y = torch.randint(0, 4, (30,), generator=gen)
    direction = unit_direction({"fc.weight": torch.randn(4, 5, generator=gen),
                                "fc.bias": torch.randn(4, generator=gen)})
    return model, x, y, direction


def _numpy_ce(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean()), np.exp(log_p)


def test_unit_direction_has_global_norm_one_and_rejects_zero():
    v = unit_direction({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])})
    assert v["a"].tolist() == pytest.approx([0.6, 0.0]) and v["b"].item() == pytest.approx(0.8)
    with pytest.raises(ValueError, match="norm"):
        unit_direction({"a": torch.zeros(3)})


def test_descent_direction_is_minus_the_closed_form_softmax_gradient(linear_case):
    model, x, y, _ = linear_case
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    xn, yn = x.double().numpy(), y.numpy()
    _, p = _numpy_ce(w, b, xn, yn)
    residual = p - np.eye(4)[yn]
    g_w, g_b = residual.T @ xn / len(yn), residual.mean(axis=0)
    norm = math.sqrt((g_w ** 2).sum() + (g_b ** 2).sum())
    v = descent_direction(model, x, y)
    np.testing.assert_allclose(v["fc.weight"].numpy(), -g_w / norm, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v["fc.bias"].numpy(), -g_b / norm, rtol=1e-4, atol=1e-6)
    assert model.fc.weight.grad is None


def test_logit_radius_is_pi_over_the_largest_slope_spread(linear_case):
    model, x, _, direction = linear_case
    slopes = x.double().numpy() @ direction["fc.weight"].double().numpy().T + direction["fc.bias"].double().numpy()
    expected = math.pi / (slopes.max(axis=1) - slopes.min(axis=1)).max()
    assert logit_radius(model, direction, x) == pytest.approx(expected, rel=1e-5)


def test_temperature_multiplies_the_radius(linear_case):
    model, x, _, direction = linear_case
    tempered = TemperatureScaled(model, 4.0)
    scaled = {"model." + name: t for name, t in direction.items()}
    assert logit_radius(tempered, scaled, x) == pytest.approx(4.0 * logit_radius(model, direction, x), rel=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        TemperatureScaled(model, 0.0)


def test_line_sweep_matches_the_closed_form_line_loss(linear_case):
    model, x, y, direction = linear_case
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    vw, vb = direction["fc.weight"].double().numpy(), direction["fc.bias"].double().numpy()
    xn, yn = x.double().numpy(), y.numpy()
    taus = [0.1, 1.0, 5.0]
    sweep = line_sweep(model, direction, taus, x, y)
    base_loss, base_p = _numpy_ce(w, b, xn, yn)
    assert sweep.base_loss == pytest.approx(base_loss, rel=1e-5)
    assert sweep.base_accuracy == pytest.approx(np.mean(base_p.argmax(1) == yn))
    for i, tau in enumerate(taus):
        loss, p = _numpy_ce(w + tau * vw, b + tau * vb, xn, yn)
        assert sweep.loss[i] == pytest.approx(loss, rel=1e-5)
        assert sweep.loss_ratio[i] == pytest.approx(loss / base_loss, rel=1e-5)
        assert sweep.accuracy[i] == pytest.approx(np.mean(p.argmax(1) == yn))
        assert sweep.accuracy_retained[i] == pytest.approx(np.mean(p.argmax(1) == yn) / np.mean(base_p.argmax(1) == yn))
        assert sweep.flip_fraction[i] == pytest.approx(np.mean(p.argmax(1) != base_p.argmax(1)))
    with pytest.raises(ValueError, match="steps"):
        line_sweep(model, direction, [], x, y)


def test_line_sweep_counts_non_finite_logits_as_infinite_loss_and_flipped(linear_case):
    model, x, y, direction = linear_case
    sweep = line_sweep(model, direction, [1e39], x, y)  # float32 overflow
    assert sweep.loss_ratio[0] == math.inf and sweep.accuracy[0] == 0.0 and sweep.flip_fraction[0] == 1.0


def test_first_crossing_interpolates_linearly_in_log_x():
    grid = [1.0, 2.0, 4.0, 8.0]
    assert first_crossing(grid, [1.0, 1.5, 3.0, 5.0], 2.0) == pytest.approx(2.0 * 2.0 ** (1 / 3))
    assert first_crossing(grid, [1.0, 0.95, 0.5, 0.1], 0.9, rising=False) == pytest.approx(2.0 * 2.0 ** (0.05 / 0.45))
    assert first_crossing(grid, [1.0, 1.0, 1.0, 1.0], 2.0) == math.inf
    assert first_crossing(grid, [3.0, 4.0, 5.0, 6.0], 2.0) == 1.0
    assert first_crossing(grid, [1.0, np.inf, 5.0, 6.0], 2.0) == 2.0
    assert first_crossing(grid, [1.0, np.nan, 5.0, 6.0], 2.0) == 2.0
    with pytest.raises(ValueError, match="increasing"):
        first_crossing([2.0, 1.0], [0.0, 1.0], 0.5)


def test_random_direction_is_seeded_and_unit():
    model = Linear(in_features=5, n_classes=3)
    first = random_direction(model, torch.Generator().manual_seed(1))
    again = random_direction(model, torch.Generator().manual_seed(1))
    other = random_direction(model, torch.Generator().manual_seed(2))
    assert sum(float(t.pow(2).sum()) for t in first.values()) == pytest.approx(1.0, rel=1e-6)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_recalibrated_batch_norm_holds_the_population_statistics():
    torch.manual_seed(0)
    model = CNNBatchNorm()
    x = torch.rand(200, 64)
    recalibrate_batch_norm(model, x)
    norm = model.features[1]
    with torch.no_grad():
        pre = model.features[0](x.unsqueeze(1))  # (N, C, L), the input of the first batch norm
    np.testing.assert_allclose(norm.running_mean.numpy(), pre.mean(dim=(0, 2)).numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norm.running_var.numpy(), pre.var(dim=(0, 2), unbiased=True).numpy(), rtol=1e-3)
    assert norm.momentum == 0.1 and model.training


def test_train_classifier_lowers_the_loss_and_checks_the_optimizer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 64, generator=gen)
    y = (x[:, 0] > 0).long()
    data = Split(x[:100], y[:100], x[100:], y[100:], n_classes=2)
    torch.manual_seed(0)
    model = Linear(n_classes=2)
    result = train_classifier(model, data, steps=60, lr=0.05, seed=0, batch_size=32, optimizer="adamw")
    assert result.steps[-1].loss < 0.5 * result.steps[0].loss
    with pytest.raises(ValueError, match="optimizer"):
        train_classifier(model, data, steps=1, lr=0.1, seed=0, optimizer="sgd")


def test_finite_stats_and_format():
    summary = finite_stats([1.0, 3.0, math.inf])
    assert summary["mean"] == 2.0 and summary["std"] == 1.0 and summary["median"] == 2.0 and summary["n_inf"] == 1
    assert format_stats(summary, beyond="never") == "2 ± 1 (1/3 never)"
    assert format_stats(finite_stats([math.inf]), beyond="never") == "never"


def test_train_to_accuracy_stops_at_the_first_check_past_the_target():
    from safestep_lab.data import load_digits_split
    from safestep_lab.evaluation import recalibrated_metrics
    from safestep_lab.models import build_model
    from safestep_lab.sweeps import train_to_accuracy

    data = load_digits_split()
    torch.manual_seed(0)
    model = build_model("linear")
    steps, accuracy = train_to_accuracy(model, data, target=0.8, max_steps=400, lr=0.01, seed=0, check_every=10)
    assert steps % 10 == 0 and steps < 400 and accuracy >= 0.8
    assert accuracy == recalibrated_metrics(model, data)[0]
    torch.manual_seed(0)
    short = build_model("linear")
    assert train_to_accuracy(short, data, target=1.0, max_steps=5, lr=0.01, seed=0, check_every=10)[0] == 5
    with pytest.raises(ValueError, match="target"):
        train_to_accuracy(short, data, target=0.0, max_steps=5, lr=0.01, seed=0)
