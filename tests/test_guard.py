"""SafeStep: the applied update is s·Δθ of the inner optimizer's actual step, bounded by r·ρ, with no side effects."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safestep import SafeStep, StepReport
from safestep.bounds import Belief
from safestep.telemetry import CSVSink


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.3, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.5),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1.0),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.3),
}


def _blobs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    centers = torch.tensor([[2.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [0, 0, 2.0, 0, 0]])
    return centers[y] + torch.randn(n, 5, generator=g), y


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _train_step(model, opt, x, y, **step_kwargs):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step(**step_kwargs)
    return loss.item()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _states_equal(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name, value in sa[k].items():
            other = sb[k][name]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, (k, name)


def _warm_pair(make_opt, x, y, warm=2):
    """A model and optimizer after `warm` plain steps (momentum/moments populated), and an exact copy."""
    model = _mlp()
    inner = make_opt(model.parameters())
    for _ in range(warm):
        _train_step(model, inner, x, y)
    twin_model, twin_inner = copy.deepcopy((model, inner))
    return model, inner, twin_model, twin_inner


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_applied_update_is_scaled_actual_update_and_state_matches(name):
    x, y = _blobs()
    model, inner, ref_model, ref_inner = _warm_pair(OPTIMIZERS[name], x, y)
    theta0 = _flat(model)
    opt = SafeStep(inner, model, r=0.05, probe_size=None)
    _train_step(model, opt, x, y)
    _train_step(ref_model, ref_inner, x, y)
    report = opt.last_report
    delta_ref = _flat(ref_model) - theta0
    assert 0 < report.scale < 1 and report.reason == "capped"
    assert report.tau == pytest.approx(delta_ref.double().norm().item(), rel=1e-5)
    applied, expected = (_flat(model) - theta0).double(), report.scale * delta_ref.double()
    assert (applied - expected).norm() <= 1e-6 * theta0.double().norm()  # fp32 rounding of θ0 + sΔθ only
    torch.testing.assert_close(_flat(model).double(), theta0.double() + expected, rtol=1e-6, atol=1e-7)
    _states_equal(inner, ref_inner)  # the inner state advanced with the raw gradient only


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_unit_scale_leaves_the_inner_result_bit_identical(name):
    x, y = _blobs()
    model, inner, ref_model, ref_inner = _warm_pair(OPTIMIZERS[name], x, y)
    opt = SafeStep(inner, model, r=1e9)
    _train_step(model, opt, x, y)
    _train_step(ref_model, ref_inner, x, y)
    assert opt.last_report.scale == 1.0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref_model.parameters()))


def test_rho_is_pi_over_max_spread_along_the_actual_update():
    x, y = _blobs(seed=1)
    torch.manual_seed(1)
    model = nn.Linear(5, 3)
    ref = copy.deepcopy(model)
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.5), model, probe_size=None)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.5)
    _train_step(model, opt, x, y)
    w0, b0 = [p.detach().clone() for p in copy.deepcopy(ref).parameters()]
    _train_step(ref, ref_opt, x, y)
    dw, db = ref.weight.detach().double() - w0.double(), ref.bias.detach().double() - b0.double()
    tau = torch.sqrt((dw**2).sum() + (db**2).sum())
    slopes = (x.double() @ dw.T + db) / tau  # analytic: a = ΔW x + Δb per unit step
    expected = math.pi / (slopes.amax(1) - slopes.amin(1)).max().item()
    assert opt.last_report.rho == pytest.approx(expected, rel=1e-5)
    assert opt.last_report.r_proposed == pytest.approx(tau.item() / expected, rel=1e-5)


@pytest.mark.parametrize("mode,r", [("cap", 0.5), ("set", 0.5), ("set", 50.0)])
def test_step_length_is_bounded_or_set(mode, r):
    x, y = _blobs(seed=2)
    model = _mlp(2)
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.2), model, r=r, mode=mode, probe_size=None)
    for _ in range(4):
        before = _flat(model).double()
        _train_step(model, opt, x, y)
        moved = (_flat(model).double() - before).norm().item()
        rep = opt.last_report
        if mode == "cap":
            assert moved <= r * rep.rho * (1 + 1e-6)
            assert moved == pytest.approx(min(rep.tau, r * rep.rho), rel=1e-5)
        else:
            assert moved == pytest.approx(r * rep.rho, rel=1e-5)
    if mode == "set" and r == 50.0:
        assert opt.last_report.scale > 1  # schedule-free: the step is enlarged to r·ρ


def test_bound_list_is_the_minimum_and_quantile_is_looser():
    x, y = _blobs(seed=3)
    reports = {}
    for key, bound, aggregate in [("ghost", "ghost", "max"), ("belief", "belief", "max"),
                                  ("both", ["ghost", "belief"], "max"), ("q", "ghost", 0.5)]:
        model = _mlp(3)
        opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.5), model, bound=bound, aggregate=aggregate,
                       probe_size=None)
        _train_step(model, opt, x, y, labels=y)
        reports[key] = opt.last_report
    assert reports["both"].rho == min(reports["ghost"].rho, reports["belief"].rho)
    binding = "ghost" if reports["ghost"].rho <= reports["belief"].rho else "belief"
    assert reports["both"].bound == binding  # the report names the member that set ρ
    assert reports["q"].rho > reports["ghost"].rho


@pytest.mark.parametrize("rule", ["paper", "support"])
def test_labels_reach_the_belief_bound_through_labels_fn(rule):
    x, y = _blobs(seed=4)
    rhos = []
    for kwargs in [dict(), dict(labels_fn=lambda inputs: y)]:
        model = _mlp(4)
        opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.5), model, bound=Belief(rule), probe_size=None, **kwargs)
        _train_step(model, opt, x, y)
        rhos.append(opt.last_report.rho)
    model = _mlp(4)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.5), model, bound=Belief(rule), probe_size=None)
    _train_step(model, opt, x, y, labels=y)
    assert rhos[1] == opt.last_report.rho and rhos[0] != rhos[1]
    if rule == "paper":
        assert rhos[0] <= rhos[1]  # without labels the predicted class is the worst case of a Fisher rule


def test_finite_difference_method_agrees_with_jvp():
    x, y = _blobs(seed=5)
    reports = {}
    for method in ("jvp", "fd"):
        model = _mlp(5)
        opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.3), model, method=method, probe_size=None)
        _train_step(model, opt, x, y)
        reports[method] = opt.last_report
    assert reports["fd"].method == "fd" and reports["jvp"].method == "jvp"
    assert reports["fd"].rho == pytest.approx(reports["jvp"].rho, rel=1e-3)


def test_default_probe_subset_and_batchnorm_forces_the_full_batch():
    x, y = _blobs()
    model = _mlp()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model)
    _train_step(model, opt, x, y)
    assert opt.last_report.rows_probed == 8 and opt.last_report.method == "jvp"  # an eighth of 64 rows
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    ref = copy.deepcopy(bn)
    opt = SafeStep(torch.optim.SGD(bn.parameters(), lr=0.1), bn, r=1e9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    _train_step(bn, opt, x, y)
    _train_step(ref, ref_opt, x, y)
    assert opt.last_report.rows_probed == 64
    for (name, b), b_ref in zip(bn.named_buffers(), ref.buffers()):
        assert torch.equal(b, b_ref), name  # only the training forward moved the running stats


def test_dropout_model_consumes_no_randomness():
    x, y = _blobs()
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    ref = copy.deepcopy(model)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, r=1e9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    torch.manual_seed(6)
    _train_step(model, opt, x, y)
    state_guarded = torch.get_rng_state()
    torch.manual_seed(6)
    _train_step(ref, ref_opt, x, y)
    assert torch.equal(state_guarded, torch.get_rng_state())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_non_finite_gradient_skips_the_step_untouched():
    x, y = _blobs()
    model, inner, _, _ = _warm_pair(OPTIMIZERS["adam"], x, y)
    opt = SafeStep(inner, model)
    saved_state = copy.deepcopy(inner.state_dict())
    theta0 = _flat(model)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    model[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert opt.last_report.skipped and "gradient" in opt.last_report.reason
    assert torch.equal(_flat(model), theta0)
    reference = copy.deepcopy(inner)
    reference.load_state_dict(saved_state)
    _states_equal(inner, reference)
    assert opt.state_dict()["param_groups"][0]["safestep_skipped"] == 1


def test_non_finite_update_restores_parameters():
    x, y = _blobs()
    model = _mlp()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=math.inf), model)
    theta0 = _flat(model)
    _train_step(model, opt, x, y)
    assert opt.last_report.skipped and "update" in opt.last_report.reason
    assert torch.equal(_flat(model), theta0)


def test_non_finite_probe_output_restores_parameters():
    x, y = _blobs()
    model = _mlp()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model,
                   logits_fn=lambda m, inputs: m(inputs) * math.inf)
    theta0 = _flat(model)
    _train_step(model, opt, x, y)
    assert opt.last_report.skipped and "probe" in opt.last_report.reason
    assert torch.equal(_flat(model), theta0)


def test_missing_batch_is_a_clear_error_and_nothing_moves():
    x, y = _blobs()
    model = _mlp()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, capture=False)
    theta0 = _flat(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="inputs="):
        opt.step()
    assert torch.equal(_flat(model), theta0)
    opt.step(inputs=x)
    assert opt.last_report.rows_probed == 8
    with torch.no_grad():  # evaluation calls are not captured
        model(x)
    capturing = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model)
    F.cross_entropy(model(x), y).backward()
    capturing.step()
    with pytest.raises(ValueError, match="inputs="):
        capturing.step()  # the batch is consumed by the step that used it


def test_frozen_and_integer_parameters_are_ignored():
    x, y = _blobs()
    model = _mlp()
    model[0].requires_grad_(False)
    model.register_parameter("count", nn.Parameter(torch.tensor([3, 4]), requires_grad=False))
    frozen = model[0].weight.detach().clone()
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.1), model)
    _train_step(model, opt, x, y)
    assert torch.equal(model[0].weight, frozen) and model.count.tolist() == [3, 4]
    assert opt.last_report.tau > 0 and not opt.last_report.skipped


def test_construction_errors():
    model, other = _mlp(), _mlp(1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        SafeStep(torch.optim.SGD(other.parameters(), lr=0.1), model)
    opt = SafeStep(torch.optim.SGD(model[0].parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="not parameters of the model"):
        opt.add_param_group({"params": other.parameters()})
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.01})
    assert opt.param_groups[1]["safestep_steps"] == 0
    with pytest.raises(ValueError, match="LBFGS"):
        SafeStep(torch.optim.LBFGS(model.parameters()), model)
    for bad in (dict(r=0.0), dict(r=math.inf), dict(mode="clip"), dict(method="exact"), dict(probe_size=0),
                dict(bound="nope"), dict(aggregate=2.0)):
        with pytest.raises(ValueError):
            SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, **bad)


def test_closure_returns_its_loss_and_feeds_the_batch():
    x, y = _blobs()
    model = _mlp()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and loss.item() > 0 and opt.last_report.rows_probed == 8


def _run(model, opt, steps, seed):
    for i in range(steps):
        x, y = _blobs(seed=seed + i)
        _train_step(model, opt, x, y)


def test_checkpoint_round_trip_resumes_bit_for_bit():
    model = _mlp(7)
    opt = SafeStep(torch.optim.AdamW(model.parameters(), lr=0.5), model, r=0.5)
    _run(model, opt, 3, seed=10)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    _run(model, opt, 3, seed=20)
    assert any(r.reason == "capped" for r in opt.history)
    fresh = _mlp(8)
    resumed = SafeStep(torch.optim.AdamW(fresh.parameters(), lr=0.5), fresh, r=0.5)
    fresh.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    assert resumed.steps == 3
    _run(fresh, resumed, 3, seed=20)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    assert resumed.steps == opt.steps == 6
    assert [r.rho for r in resumed.history] == [r.rho for r in list(opt.history)[3:]]


def test_grad_scaler_on_cpu_matches_the_unscaled_run():
    results = []
    for enabled in (True, False):
        model = _mlp(9)
        opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.5), model, r=0.5)
        scaler = torch.amp.GradScaler("cpu", enabled=enabled)
        for i in range(3):
            x, y = _blobs(seed=30 + i)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        assert opt.steps == 3
        results.append(_flat(model))
    assert torch.equal(results[0], results[1])


def test_lr_scheduler_and_step_hooks_work_on_the_wrapper():
    x, y = _blobs()
    model = _mlp()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=1.0), model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    handle = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o.last_report.step)))
    for _ in range(3):
        _train_step(model, opt, x, y)
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    assert calls[:2] == [("pre", opt), ("post", 0)] and len(calls) == 6
    handle.remove()
    _train_step(model, opt, x, y)
    assert len(calls) == 7


def test_history_is_bounded_and_streams(tmp_path):
    x, y = _blobs()
    model = _mlp()
    sink = CSVSink(tmp_path / "steps.csv")
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, history=2, sinks=[sink])
    for _ in range(3):
        _train_step(model, opt, x, y)
    assert isinstance(opt.last_report, StepReport) and opt.last_report is opt.history[-1]
    assert len(opt.history) == 2 and [r.step for r in opt.history] == [1, 2]
    assert len((tmp_path / "steps.csv").read_text().splitlines()) == 4
    assert opt.last_report.seconds > 0


class _SeqModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.out = nn.Linear(8, 13)

    def forward(self, input_ids):
        return {"logits": self.out(torch.tanh(self.emb(input_ids)))}


def test_sequence_model_with_dict_batch_counts_every_position():
    torch.manual_seed(11)
    model = _SeqModel()
    ref = copy.deepcopy(model)
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.5), model, probe_size=None)
    ids = torch.randint(0, 13, (4, 6))
    batch = {"input_ids": ids}
    logits = model(**batch)["logits"]
    F.cross_entropy(logits[:, :-1].reshape(-1, 13), ids[:, 1:].reshape(-1)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt.step()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.5)
    for p, g in zip(ref.parameters(), grads):
        p.grad = g
    ref_opt.step()
    delta = [q.detach() - t for q, t in zip(ref.parameters(), theta0)]
    tau = torch.sqrt(sum((d.double() ** 2).sum() for d in delta))

    def f(*params):  # independent slopes: double-VJP JVP of torch.autograd.functional
        w_emb, w_out, b_out = params
        return torch.tanh(w_emb[ids]) @ w_out.T + b_out

    _, slopes = torch.autograd.functional.jvp(f, tuple(theta0), tuple(d / tau.float() for d in delta))
    expected = math.pi / (slopes.amax(-1) - slopes.amin(-1)).max().item()
    assert opt.last_report.rho == pytest.approx(expected, rel=1e-4)
    assert opt.last_report.rows_probed == 4


def test_lr_spike_is_contained():
    """Adam with the LR spiked ×10,000 for steps 20–34 of 60: plain training's loss explodes, the capped run's does not."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(192) % 3
    angles = torch.tensor([0.0, 2.1, 4.2])[y]
    x = torch.stack([angles.cos(), angles.sin()], 1) * 2 + torch.randn(192, 2, generator=g)
    x = torch.cat([x, torch.randn(192, 3, generator=g)], 1)
    outcomes = {}
    for guarded in (False, True):
        model = _mlp(12)
        inner = torch.optim.Adam(model.parameters(), lr=1e-2)
        opt = SafeStep(inner, model, r=1.0, probe_size=None) if guarded else inner
        losses = []
        for step in range(60):
            for group in inner.param_groups:
                group["lr"] = 1e-2 * (1e4 if 20 <= step < 35 else 1.0)
            losses.append(_train_step(model, opt, x, y))
            if guarded:
                rep = opt.last_report
                assert rep.tau * rep.scale <= rep.rho * (1 + 1e-6)  # every applied step within ρ
        with torch.no_grad():
            logits = model(x)
        final = F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
        outcomes[guarded] = (*final, max(losses[20:]))
        if guarded:
            assert sum(r.reason == "capped" for r in list(opt.history)[20:35]) == 15
    (plain_loss, plain_acc, plain_peak), (safe_loss, safe_acc, safe_peak) = outcomes[False], outcomes[True]
    assert losses[19] < 0.4  # measured ≈ 0.30 just before the spike
    assert plain_peak > 20 and plain_loss > 10  # measured: peak ≈ 127, final ≈ 118
    assert safe_peak < 0.5 and safe_loss < 0.1 and safe_acc > 0.95  # measured: final ≈ 0.025, acc 0.995
    assert plain_acc < safe_acc


def test_monitor_mode_measures_but_applies_exactly_what_the_inner_optimizer_does():
    x, y = _blobs()
    model, inner, ref_model, ref_inner = _warm_pair(lambda p: torch.optim.Adam(p, lr=3.0), x, y)
    capped_model, capped_inner = copy.deepcopy((model, inner))
    monitor = SafeStep(inner, model, mode="monitor", probe_size=None)
    capped = SafeStep(capped_inner, capped_model, mode="cap", probe_size=None)
    theta0 = _flat(model)
    _train_step(model, monitor, x, y)
    _train_step(capped_model, capped, x, y)
    _train_step(ref_model, ref_inner, x, y)
    assert torch.equal(_flat(model), _flat(ref_model))  # bit for bit the unwrapped step, although r > 1
    _states_equal(inner, ref_inner)
    report = monitor.last_report
    assert report.scale == 1.0 and not report.skipped and report.r_proposed > 1
    assert report.tau == pytest.approx((_flat(ref_model) - theta0).double().norm().item(), rel=1e-5)
    assert report.rho == pytest.approx(capped.last_report.rho, rel=1e-9)  # the same radius a guarded step uses
    assert capped.last_report.scale < 1


def test_monitor_mode_applies_non_finite_steps_like_a_plain_optimizer():
    x, y = _blobs()
    model = _mlp()
    twin = copy.deepcopy(model)
    monitor = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="monitor")
    plain = torch.optim.SGD(twin.parameters(), lr=0.1)
    for m, opt in ((model, monitor), (twin, plain)):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        m[0].weight.grad[0, 0] = math.nan
        opt.step()
    assert torch.equal(_flat(model).isnan(), _flat(twin).isnan()) and _flat(model).isnan().any()
    assert not monitor.last_report.skipped and monitor.last_report.scale == 1.0
    assert "applied unmeasured" in monitor.last_report.reason
