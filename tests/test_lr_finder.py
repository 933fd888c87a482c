"""find_lr: per-step lr_safe = λ·ρ/τ checked by hand, the suggestion checked by independent replay, state restored."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from safestep import LRFinderResult, find_lr
from safestep.lr_finder import rolling_min


def _blobs(n=96, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    centers = 2.0 * torch.eye(k, d)
    return centers[y] + torch.randn(n, d, generator=g), y


def _batches(batch=16, **kw):
    x, y = _blobs(**kw)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def _mlp(seed=0, d=5, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 16), nn.Tanh(), nn.Linear(16, k))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_linear_sgd_lr_safe_matches_closed_form_replay():
    """z = Wx + b, update −λg: slopes ∝ G_W x + g_b, so lr_safe = ρ/‖g‖ = π / max_n spread(G_W x_n + g_b)."""
    batches = _batches()
    torch.manual_seed(1)
    model = nn.Linear(5, 3)
    w0, b0 = (p.detach().double().numpy().copy() for p in (model.weight, model.bias))
    result = find_lr(model, torch.optim.SGD(model.parameters(), lr=0.05), batches, num_steps=8, rounds=3)
    assert isinstance(result, LRFinderResult) and len(result.rounds) >= 2
    for rnd in result.rounds:
        w, b = w0.copy(), b0.copy()
        for step, (x, y) in zip(rnd.steps, [batches[t % len(batches)] for t in range(8)]):
            x, y = x.double().numpy(), y.numpy()
            p = _softmax(x @ w.T + b)
            p[np.arange(len(y)), y] -= 1.0
            g_z = p / len(y)  # d(mean CE)/dz
            g_w, g_b = g_z.T @ x, g_z.sum(axis=0)
            slopes = x @ g_w.T + g_b  # (B, K): −a·‖g‖
            spread = (slopes.max(axis=1) - slopes.min(axis=1)).max()
            grad_norm = math.sqrt((g_w ** 2).sum() + (g_b ** 2).sum())
            assert step.lr_safe == pytest.approx(math.pi / spread, rel=1e-4)
            assert step.tau == pytest.approx(rnd.lr * grad_norm, rel=1e-4)
            assert step.r == pytest.approx(rnd.lr * spread / math.pi, rel=1e-4)
            w, b = w - rnd.lr * g_w, b - rnd.lr * g_b
    first = result.rounds[0]
    assert result.rounds[1].lr < first.lr / first.max_r  # aims just below min_t lr_safe_t of round 0
    assert result.rounds[1].lr == pytest.approx(first.lr / first.max_r, rel=0.05)


def _independent_r(model, x, theta0, theta1):
    """r = τ/ρ with ρ = π / max_n spread(J_z(θ0)·v), v = (θ1 − θ0)/τ, by torch.func.jvp."""
    delta = {n: theta1[n] - theta0[n] for n in theta0}
    tau = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())).item()
    tangent = {n: d / tau for n, d in delta.items()}
    _, a = jvp(lambda p: functional_call(model, p, (x,)), (theta0,), (tangent,))
    return tau * (a.max(dim=1).values - a.min(dim=1).values).max().item() / math.pi


def _replay_adam(lr, batches, num_steps):
    """Plain Adam training at ``lr`` from _mlp(); returns r per step measured independently."""
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    rs = []
    for t in range(num_steps):
        x, y = batches[t % len(batches)]
        theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        rs.append(_independent_r(model, x, theta0, {n: p.detach().clone() for n, p in model.named_parameters()}))
    return rs


def test_adam_at_the_suggestion_keeps_every_warmup_step_below_r_one():
    batches = _batches()
    model = _mlp()
    result = find_lr(model, torch.optim.Adam(model.parameters(), lr=1e-3), batches, num_steps=12)
    assert result.verified and math.isfinite(result.suggestion)
    rs = _replay_adam(result.suggestion, batches, 12)
    assert max(rs) <= 1.0
    assert rs == pytest.approx([s.r for s in result.steps], rel=1e-4)
    # near the largest: every failed round lies above the suggestion, and twice the suggestion fails on replay
    assert all(r.lr > result.suggestion for r in result.rounds if not r.verified)
    assert max(_replay_adam(2 * result.suggestion, batches, 12)) > 1.0
    assert max(rs) * (1 + 0.05) >= 1.0 or any(not r.verified and r.lr <= result.suggestion * 1.05 for r in result.rounds)


def test_model_optimizer_grads_and_rng_are_restored():
    x, y = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # populate Adam moments, step counts and BN running statistics
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model_before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(opt.state_dict())
    grads_before = [p.grad.clone() for p in model.parameters()]
    rng_before = torch.get_rng_state()
    find_lr(model, opt, _batches(), num_steps=5, rounds=2)
    assert torch.equal(torch.get_rng_state(), rng_before)
    after = model.state_dict()
    assert after.keys() == model_before.keys()
    assert all(torch.equal(after[k], model_before[k]) for k in after)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads_before))
    opt_after = opt.state_dict()
    assert opt_after["param_groups"] == opt_before["param_groups"]
    assert opt_after["state"].keys() == opt_before["state"].keys()
    for k, state in opt_before["state"].items():
        assert state.keys() == opt_after["state"][k].keys()
        assert all(torch.equal(v, opt_after["state"][k][name]) for name, v in state.items())
    assert opt.param_groups[0]["params"] == list(model.parameters())  # still optimizes the live parameters


def test_state_is_restored_when_the_search_fails_midway():
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []

    def progress(step):
        calls.append(step)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        find_lr(model, opt, _batches(), num_steps=10, progress=progress)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.state_dict()["state"] == {} and opt.param_groups[0]["lr"] == 0.1


def test_deterministic_with_a_shuffling_loader_and_dropout():
    x, y = _blobs()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)

    def run(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        return find_lr(model, torch.optim.Adam(model.parameters(), lr=1e-2), loader, num_steps=6, rounds=2, seed=seed)

    first, again, other = run(0), run(0), run(1)
    assert first.rounds == again.rounds and first.suggestion == again.suggestion
    assert [s.r for s in first.rounds[0].steps] != [s.r for s in other.rounds[0].steps]


class _CountingLoader:
    """An iterable over fixed batches that counts how often it was iterated and how many batches it yielded."""

    def __init__(self, batches):
        self.batches, self.iterations, self.yielded = batches, 0, 0

    def __iter__(self):
        self.iterations += 1
        for batch in self.batches:
            self.yielded += 1
            yield batch


def test_progress_sees_every_step_and_the_loader_is_cycled():
    seen = []
    loader = _CountingLoader(_batches()[:2])
    model = _mlp()
    result = find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), loader, num_steps=5, rounds=2,
                     progress=seen.append)
    assert seen == [s for rnd in result.rounds for s in rnd.steps]
    assert [s.step for s in result.rounds[0].steps] == [0, 1, 2, 3, 4]
    assert loader.yielded == 5 * len(result.rounds) and loader.iterations == 3 * len(result.rounds)


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, pixels):
        return {"logits": self.body(pixels), "aux": pixels.sum()}


def test_dict_batches_with_inputs_fn_match_tuple_batches():
    batches = _batches()
    dict_batches = [{"pixels": x, "label": y} for x, y in batches]
    model = _DictModel()
    got = find_lr(model, torch.optim.Adam(model.parameters(), lr=1e-2), dict_batches, num_steps=6, rounds=2,
                  inputs_fn=lambda b: ({"pixels": b["pixels"]}, b["label"]),
                  logits_fn=lambda m, inputs: m(**inputs)["logits"])
    plain = _mlp()
    want = find_lr(plain, torch.optim.Adam(plain.parameters(), lr=1e-2), batches, num_steps=6, rounds=2)
    assert [s.r for s in got.steps] == pytest.approx([s.r for s in want.steps], rel=1e-6)
    assert got.suggestion == pytest.approx(want.suggestion, rel=1e-6)


class _Regressor(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.fc = nn.Linear(5, out)

    def forward(self, x):
        return self.fc(x).squeeze(-1) if self.fc.out_features == 1 else self.fc(x)


@pytest.mark.parametrize("kwargs, loader, message", [
    ({}, [], "no batches"),
    ({}, [{"x": torch.zeros(2, 5)}], "inputs_fn"),
    ({"num_steps": 0}, None, "num_steps"),
    ({"rounds": 0}, None, "rounds"),
    ({"initial_lr": -1.0}, None, "learning rate"),
    ({"window": 0}, None, "window"),
    ({"rtol": 0.0}, None, "rtol"),
])
def test_invalid_input_raises_value_error(kwargs, loader, message):
    model = _mlp()
    with pytest.raises(ValueError, match=message):
        find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), _batches() if loader is None else loader, **kwargs)


@pytest.mark.parametrize("out", [1, 3])
def test_non_classification_output_is_rejected(out):
    model = _Regressor(out)
    loader = [(torch.zeros(4, 5), torch.zeros(4, dtype=torch.long))]
    if out == 3:
        model = nn.Sequential(model, nn.Flatten(0))  # (B·K,) vector: no class dimension
    with pytest.raises(ValueError, match=r"not logits of shape \(B, K\)"):
        find_lr(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)


def test_rolling_min_by_hand():
    assert rolling_min([3, 1, 4, 1, 5, 9, 2, 6], 3) == [1, 1, 1, 1, 1, 2, 2, 2]
    assert rolling_min([3, math.nan, 4], 1)[0] == 3 and math.isnan(rolling_min([3, math.nan, 4], 1)[1])


def test_schedule_is_a_floor_of_lr_safe_and_plots_are_written(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    model = _mlp()
    result = find_lr(model, torch.optim.Adam(model.parameters(), lr=1e-3), _batches(), num_steps=8, rounds=3)
    assert len(result.schedule) == 8
    assert all(s <= v for s, v in zip(result.schedule, result.lr_safe))
    assert min(result.lr_safe) >= result.suggestion  # every step of the verified round had r ≤ 1
    ax = result.plot()
    assert isinstance(ax, Axes) and ax.get_yscale() == "log"
    assert any(list(line.get_ydata()) == [1.0, 1.0] for line in ax.get_lines())  # the r = 1 line
    assert len(ax.get_lines()) == len(result.rounds) + 1
    ax2 = result.plot_schedule()
    assert isinstance(ax2, Axes) and ax2.get_yscale() == "log"
    for name, axes in (("r.png", ax), ("schedule.png", ax2)):
        axes.figure.savefig(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 5000
    plt.close("all")
