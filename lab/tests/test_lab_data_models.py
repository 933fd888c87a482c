"""Lab data, models and the training loop, checked against sklearn's raw arrays and hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from safestep_lab.data import as_images, as_row_tokens, load_digits_split, load_tabular_split, split_indices
from safestep_lab.models import MODEL_NAMES, CNNBatchNorm, RowTransformer, build_model
from safestep_lab.training import clipped, constant_lr, evaluate, guarded, lr_spike, plain, train

# sklearn digits class counts 0..9 (REFERENCE.md, "digits")
DIGITS_CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def raw_digits():
    from sklearn.datasets import load_digits

    return load_digits()


def _sorted_rows(x: torch.Tensor) -> np.ndarray:
    a = x.numpy()
    return a[np.lexsort(a.T[::-1])]


def test_digits_split_sizes_and_stratified_counts(digits):
    expected_test = [round(0.2 * n) for n in DIGITS_CLASS_COUNTS]
    assert torch.bincount(digits.y_test, minlength=10).tolist() == expected_test
    assert torch.bincount(digits.y_train, minlength=10).tolist() == [n - t for n, t in zip(DIGITS_CLASS_COUNTS, expected_test)]
    assert digits.x_train.shape == (1797 - sum(expected_test), 64) and digits.x_test.shape == (sum(expected_test), 64)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.n_classes == 10 and digits.n_features == 64


def test_digits_split_partitions_the_dataset_scaled_by_one_sixteenth(digits, raw_digits):
    both = torch.cat([digits.x_train, digits.x_test])
    np.testing.assert_array_equal(_sorted_rows(both), _sorted_rows(torch.as_tensor(raw_digits.data / 16.0, dtype=torch.float32)))
    assert both.min() == 0.0 and both.max() == 1.0
    assert torch.equal(both * 16, (both * 16).round())


def test_split_indices_disjoint_cover_and_deterministic():
    labels = np.repeat(np.arange(3), [10, 20, 30])
    train, test = split_indices(labels, 0.3, seed=5)
    assert np.intersect1d(train, test).size == 0
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(60))
    assert np.bincount(labels[test]).tolist() == [3, 6, 9]
    again = split_indices(labels, 0.3, seed=5)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, split_indices(labels, 0.3, seed=6)[1])


def test_digits_split_determinism_and_unstratified_size():
    a, b, c = load_digits_split(seed=3), load_digits_split(seed=3), load_digits_split(seed=4)
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert not torch.equal(a.x_test, c.x_test)
    flat = load_digits_split(test_fraction=0.25, seed=0, stratified=False)
    assert len(flat.y_test) == round(0.25 * 1797)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_test_fraction_raises(fraction):
    with pytest.raises(ValueError, match="test_fraction"):
        split_indices(np.arange(10) % 2, fraction, seed=0)


def test_image_and_row_token_views_match_sklearn_images(raw_digits):
    x = torch.as_tensor(raw_digits.data[:5] / 16.0, dtype=torch.float32)
    expected = torch.as_tensor(raw_digits.images[:5] / 16.0, dtype=torch.float32)
    assert torch.equal(as_images(x)[:, 0], expected)
    assert torch.equal(as_row_tokens(x)[:, 2], expected[:, 2, :])  # token 2 = third image row
    with pytest.raises(ValueError, match="flat digits"):
        as_images(torch.zeros(3, 63))


def test_tabular_split_standardised_with_train_statistics():
    from sklearn.datasets import load_wine

    split = load_tabular_split("wine", seed=1)
    assert torch.allclose(split.x_train.mean(0), torch.zeros(13), atol=1e-5)
    assert torch.allclose(split.x_train.std(0), torch.ones(13), atol=1e-4)
    raw = load_wine().data
    train_idx, test_idx = split_indices(load_wine().target, 0.2, seed=1)
    mu, sd = raw[train_idx].mean(0), raw[train_idx].std(0, ddof=1)
    np.testing.assert_allclose(split.x_test.numpy(), (raw[test_idx] - mu) / sd, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="unknown tabular dataset"):
        load_tabular_split("iris")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_registered_model_maps_flat_digits_to_ten_logits(name):
    torch.manual_seed(0)
    model = build_model(name)
    out = model(torch.rand(5, 64))
    assert out.shape == (5, 10) and torch.isfinite(out).all()


def test_build_model_rejects_unknown_names_and_passes_kwargs():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    assert build_model("mlp", hidden=7).net[0].out_features == 7
    deep = build_model("transformer-deep")
    assert len(deep.blocks) == 3 and deep.embed.out_features == 128
    assert build_model("cnn-wide").features[0].out_channels == 100


def test_row_transformer_uses_row_order_and_attention_mixes_tokens():
    torch.manual_seed(0)
    model = RowTransformer(d_model=16, n_heads=2, n_layers=1).eval()
    x = torch.rand(4, 64)
    swapped = as_row_tokens(x)[:, [1, 0, 2, 3, 4, 5, 6, 7]].reshape(4, 64)
    assert not torch.allclose(model(x), model(swapped), atol=1e-5)
    # token 0's attention output depends on token 5's content (a length-1 "transformer" would not)
    tokens = model.embed(as_row_tokens(x)) + model.position
    changed = tokens.clone()
    changed[:, 5] += torch.linspace(-1.0, 1.0, 16)  # not constant: LayerNorm would remove a constant shift
    block = model.blocks[0]
    out, out_changed = block.attn(block.norm_attn(tokens)), block.attn(block.norm_attn(changed))
    assert not torch.allclose(out[:, 0], out_changed[:, 0], atol=1e-6)


def test_cnn_batchnorm_train_and_eval_outputs_differ():
    torch.manual_seed(0)
    model = CNNBatchNorm()
    x = torch.rand(8, 64)
    train_out = model.train()(x)
    assert not torch.allclose(train_out, model.eval()(x), atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        model(torch.rand(2, 1, 64))


def test_mlp_overfits_a_small_batch():
    torch.manual_seed(0)
    data = load_digits_split()
    x, y = data.x_train[:32], data.y_train[:32]
    model = build_model("mlp")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(x).argmax(1) == y).all()


def test_lr_schedules():
    spike = lr_spike(1e-3, 1e4, start=3, stop=5)
    assert [spike(t) for t in range(7)] == [1e-3, 1e-3, 1e-3, 10.0, 10.0, 1e-3, 1e-3]
    assert constant_lr(0.5)(123) == 0.5
    with pytest.raises(ValueError, match="spike window"):
        lr_spike(1e-3, 10, start=5, stop=3)
    with pytest.raises(ValueError, match="positive"):
        constant_lr(0.0)


def test_evaluate_counts_nonfinite_logits_as_wrong():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x

    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [math.nan, 9.0], [5.0, 1.0]])
    acc, loss = evaluate(Fixed(), logits, torch.tensor([0, 1, 1, 1]))
    assert acc == 0.5 and math.isnan(loss)
    finite_acc, finite_loss = evaluate(Fixed(), logits[[0, 1, 3]], torch.tensor([0, 1, 1]))
    expected = -(torch.log_softmax(logits[[0, 1, 3]], 1)[[0, 1, 2], [0, 1, 1]]).mean()
    assert finite_acc == pytest.approx(2 / 3) and finite_loss == pytest.approx(float(expected), rel=1e-6)


def _adam(lr: float = 1e-3):
    return lambda params: torch.optim.Adam(params, lr=lr)


def test_train_is_deterministic_and_learns(digits):
    def run():
        torch.manual_seed(0)
        return train(build_model("mlp"), _adam(1e-2), digits, steps=60, batch_size=64, seed=1, eval_every=20)

    a, b = run(), run()
    assert [s.loss for s in a.steps] == [s.loss for s in b.steps]
    assert [e.step for e in a.evals] == [0, 20, 40, 60]
    assert a.evals[0].accuracy < 0.5  # untrained
    assert a.test_accuracy == b.test_accuracy > 0.85 and not a.diverged
    assert a.evals[-1].accuracy == a.test_accuracy


def test_train_marks_divergence_and_stops(digits):
    torch.manual_seed(0)
    poisoned = lambda t: math.nan if t == 3 else 1e-3  # noqa: E731  (a NaN LR turns the weights NaN at step 3)
    result = train(build_model("mlp"), _adam(), digits, steps=20, lr_schedule=poisoned)
    assert result.diverged and result.diverged_at == 4 and len(result.steps) == 5
    assert math.isnan(result.steps[-1].loss) and result.test_accuracy == 0.0


def test_clip_guard_bounds_the_sgd_step(digits):
    torch.manual_seed(0)
    model = build_model("mlp")
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    train(model, lambda p: torch.optim.SGD(p, lr=1.0), digits, steps=1, rule=clipped(0.25))
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() == pytest.approx(0.25, rel=1e-4)  # the raw gradient norm is far above 0.25


def _distance(model, W0: torch.Tensor, b0: torch.Tensor) -> float:
    """‖θ − θ0‖ of a linear model's (W, b)."""
    W, b = model.fc.weight.detach(), model.fc.bias.detach()
    return math.sqrt(float(((W - W0) ** 2).sum() + ((b - b0) ** 2).sum()))


def _linear_full_batch_step(digits, lr: float):
    """Closed form for a linear model z = Wx + b: Δθ = −lr·∇L, slopes a(x) = (ΔW x + Δb)/τ, ρ = π / max_x spread(a)."""
    torch.manual_seed(0)
    model = build_model("linear")
    W0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    loss = F.cross_entropy(model(digits.x_train), digits.y_train)
    gW, gb = torch.autograd.grad(loss, [model.fc.weight, model.fc.bias])
    dW, db = -lr * gW.double(), -lr * gb.double()
    tau = math.sqrt(float((dW**2).sum() + (db**2).sum()))
    slopes = (digits.x_train.double() @ dW.T + db) / tau
    rho = math.pi / float((slopes.amax(1) - slopes.amin(1)).max())
    return model, (W0, b0), tau, rho


def test_monitor_measures_tau_and_rho_of_a_plain_step_against_the_closed_form(digits):
    full = len(digits.y_train)  # one batch = the whole (permuted) training set, so the gradient is known
    model, (W0, b0), tau, rho = _linear_full_batch_step(digits, lr=0.5)
    result = train(model, lambda p: torch.optim.SGD(p, lr=0.5), digits, steps=1, batch_size=full,
                   rule=plain(monitor={"probe_size": None, "method": "jvp"}))
    record = result.steps[0]
    moved = _distance(model, W0, b0)
    assert record.tau == pytest.approx(tau, rel=1e-4) and moved == pytest.approx(tau, rel=1e-4)  # step untouched
    assert record.rho == pytest.approx(rho, rel=1e-4) and record.r_proposed == pytest.approx(tau / rho, rel=1e-4)
    assert record.scale == 1.0 and result.steps_capped == 0  # measured, never scaled


def test_safestep_guard_caps_a_long_step_at_the_closed_form_radius(digits):
    full = len(digits.y_train)
    model, (W0, b0), tau, rho = _linear_full_batch_step(digits, lr=1e3)
    assert tau > 10 * rho  # the raw SGD step is far outside the radius
    result = train(model, lambda p: torch.optim.SGD(p, lr=1e3), digits, steps=1, batch_size=full,
                   rule=guarded(probe_size=None, method="jvp"))
    moved = _distance(model, W0, b0)
    assert moved == pytest.approx(rho, rel=1e-4)
    record = result.steps[0]
    assert record.scale == pytest.approx(rho / tau, rel=1e-4) and result.steps_capped == 1


def test_train_rejects_bad_arguments(digits):
    model = build_model("linear")
    with pytest.raises(ValueError, match="steps"):
        train(model, _adam(), digits, steps=-1)
    with pytest.raises(TypeError):
        train(model, _adam(), digits, steps=1, guard="safestep")  # step rules replaced the guard strings
