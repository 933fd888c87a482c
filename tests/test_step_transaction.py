"""A guarded step is all or nothing: every failure leaves θ0, the counters, the report and the history as they were."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safestep import SafeStep

from _small import small_data, small_mlp


def _data(n=32, k=5, seed=0):
    return small_data(n, k, seed)


def _mlp(k=5, seed=0):
    return small_mlp(k, seed)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(model, saved):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), saved))


def _backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _adam_steps(opt):
    return [int(s["step"]) for s in opt.optimizer.state.values()]


class _State:
    """What a step must leave alone when it fails: θ, counters, last report, history length, inner state."""

    def __init__(self, model, opt):
        self.theta = _params(model)
        self.steps = opt.steps
        self.report = opt.last_report
        self.history = len(opt.history)
        self.inner = _adam_steps(opt)

    def unchanged(self, model, opt, inner_advanced):
        assert _same(model, self.theta), "parameters moved"
        assert opt.steps == self.steps and opt.last_report is self.report and len(opt.history) == self.history
        advanced = [s + 1 for s in self.inner] if self.inner else [1] * len(list(model.parameters()))
        assert _adam_steps(opt) == (advanced if inner_advanced else self.inner)


def test_the_issue_reproducer_raises_before_anything_moves():
    model = _mlp()
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, bound="belief")
    x, y = _data()
    _backward(model, x, y)
    before = _State(model, opt)
    with pytest.raises(ValueError, match=r"labels have shape \(7,\) but the batch has 32 rows"):
        opt.step(labels=y[:7])
    before.unchanged(model, opt, inner_advanced=False)
    opt.step(labels=y)  # the same batch, with its labels, steps normally afterwards
    assert opt.steps == 1 and not opt.last_report.skipped


class _FailOn:
    """Raise ``error`` on call number ``when`` (1-based) of ``fn``; calls before it pass through."""

    def __init__(self, fn, when, error):
        self.fn, self.when, self.error, self.calls = fn, when, error, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls == self.when:
            raise self.error
        return self.fn(*args)


class _BrokenSink:
    def __init__(self, error):
        self.error = error

    def write(self, report):
        raise self.error

    def close(self):
        pass


def test_a_failure_after_the_inner_step_restores_theta0_bit_for_bit():
    model = _mlp()
    x, y = _data()
    logits = _FailOn(lambda model, inputs: model(inputs), 3, RuntimeError("user logits_fn broke"))
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, logits_fn=logits)
    _backward(model, x, y)
    opt.step(labels=y)  # the first step succeeds (its preflight calls logits_fn once, its probe once)
    _backward(model, x, y)
    before = _State(model, opt)
    with pytest.raises(RuntimeError, match="user logits_fn broke") as raised:
        opt.step(labels=y)
    before.unchanged(model, opt, inner_advanced=True)
    notes = " ".join(getattr(raised.value, "__notes__", []))
    assert "parameters are restored" in notes and "state" in notes and "has advanced" in notes


def test_labels_out_of_range_on_a_later_step_raise_before_anything_moves():
    model = _mlp()
    x, y = _data()
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, probe_size=2)
    _backward(model, x, y)
    opt.step(labels=y)
    _backward(model, x, y)
    before = _State(model, opt)
    bad = y.clone()
    bad[-1] = 9  # one row, almost surely not among the 2 probed ones: every label is checked, not only probed ones
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\).*1 row"):
        opt.step(labels=bad)
    before.unchanged(model, opt, inner_advanced=False)


class _LoggingSink:
    def __init__(self):
        self.steps = []

    def write(self, report):
        self.steps.append(report.step)

    def close(self):
        pass


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_sink_that_fails_loses_only_its_copy_of_a_committed_step(tmp_path, error):
    model = _mlp()
    x, y = _data()
    first, broken = _LoggingSink(), _BrokenSink(error)
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, sinks=[first, broken])
    _backward(model, x, y)
    with pytest.raises(type(error)) as raised:
        opt.step(labels=y)
    assert opt.steps == 1 and opt.last_report is not None and len(opt.history) == 1  # the step committed
    if isinstance(error, Exception):
        assert "was applied and recorded" in " ".join(getattr(raised.value, "__notes__", []))
    broken.error = None
    broken.write = lambda report: None  # the sink recovers: the next step reaches both, none is repeated
    _backward(model, x, y)
    opt.step(labels=y)
    assert first.steps == [0, 1]


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _CustomNet(nn.Module):
    def __init__(self, k=5):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, k)

    def forward(self, x):
        return self.b(_NoForwardAD.apply(self.a(x)))


@pytest.mark.parametrize("problem", ["jvp unsupported", "one class", "labels shape", "labels type"])
def test_what_can_be_checked_is_checked_before_the_inner_step(problem):
    torch.manual_seed(0)
    model = _CustomNet() if problem == "jvp unsupported" else _mlp(k=1 if problem == "one class" else 5)
    x, y = _data(k=5)
    method = "jvp" if problem == "jvp unsupported" else "auto"
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, method=method)
    _backward(model, x, y.clamp(max=0) if problem == "one class" else y)
    before = _State(model, opt)
    labels = {"labels shape": y[:, None].expand(32, 3), "labels type": y.float()}.get(problem)
    match = {"jvp unsupported": "method='jvp' cannot probe", "one class": "K = 1", "labels shape": "labels",
             "labels type": "integer tensor"}[problem]
    with pytest.raises(ValueError, match=match):
        opt.step(labels=labels)
    before.unchanged(model, opt, inner_advanced=False)  # nothing ran: Adam has no state yet


def test_a_model_that_raises_during_the_probe_rolls_back_and_the_next_step_works():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.fail_next_probe = False

        def forward(self, x):
            if self.fail_next_probe and not torch.is_grad_enabled():  # the probe runs under no_grad
                self.fail_next_probe = False
                raise RuntimeError("CUDA out of memory (simulated)")
            return self.net(x)

    model = Flaky()
    x, y = _data()
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    _backward(model, x, y)
    opt.step()
    _backward(model, x, y)
    model.fail_next_probe = True
    before = _State(model, opt)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step()
    before.unchanged(model, opt, inner_advanced=True)
    assert opt.probe.fallback == ""  # method="auto" did not hide the error by switching to finite differences
    _backward(model, x, y)
    opt.step()
    assert opt.steps == 2 and opt.last_report.method == "jvp"


def test_auto_falls_back_only_for_a_missing_forward_ad_rule_and_says_so_once():
    model = _CustomNet()
    x, y = _data()
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    _backward(model, x, y)
    with pytest.warns(RuntimeWarning, match="no forward-mode AD rule.*finite differences from now on"):
        opt.step()  # the first step's preflight finds out, before the inner step
    assert opt.last_report.method == "fd"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            _backward(model, x, y)
            opt.step()
    assert [r.method for r in opt.history] == ["fd"] * 3


def test_a_module_without_forward_is_refused_at_construction_with_the_fix():
    class Lit(nn.Module):  # a LightningModule-like wrapper: training_step calls self.net
        def __init__(self):
            super().__init__()
            self.net = _mlp()

    lit = Lit()
    with pytest.raises(ValueError, match=r"no forward\(\).*SafeStep\(optimizer, self.net\).*logits_fn"):
        SafeStep(torch.optim.SGD(lit.parameters(), lr=0.1), lit)
    opt = SafeStep(torch.optim.SGD(lit.parameters(), lr=0.1), lit, logits_fn=lambda m, x: m.net(x))
    x, y = _data()
    _backward(lit.net, x, y)
    opt.step(inputs=x)
    assert not opt.last_report.skipped and opt.last_report.method == "jvp"


def test_non_finite_gradients_skip_without_touching_the_inner_state():
    model = _mlp()
    x, y = _data()
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    _backward(model, x, y)
    next(model.parameters()).grad[0, 0] = math.nan
    before = _State(model, opt)
    opt.step()
    assert opt.last_report.skipped and "non-finite gradient" in opt.last_report.reason
    assert _same(model, before.theta) and _adam_steps(opt) == [] and opt.steps == 1


def test_a_run_frozen_by_its_bound_is_reported_and_warned_once():
    from safestep.watch import FREEZE_SCALE, FREEZE_STEPS

    model = _mlp()
    x, y = _data()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=50.0), model, r=1e-3)  # every step cut to ~1e-3 of itself
    with pytest.warns(RuntimeWarning, match=r"frozen: scale < 0.1 for 50 steps, set by the ghost bound") as caught:
        for _ in range(FREEZE_STEPS + 3):
            _backward(model, x, y)
            opt.step()
    assert len([w for w in caught if "frozen" in str(w.message)]) == 1
    reports = list(opt.history)
    assert all(r.scale < FREEZE_SCALE for r in reports)
    assert "frozen" not in reports[FREEZE_STEPS - 2].reason and "frozen" in reports[FREEZE_STEPS - 1].reason
    assert "set by the ghost bound" in reports[-1].reason
