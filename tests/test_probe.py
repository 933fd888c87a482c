"""Probe: slopes against analytic values, finite differences of the trained function, and side effects."""
import copy
import gc
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad

from safestep.probe import (
    CallArgs,
    InputCapture,
    LogitProbe,
    batch_size,
    extract_logits,
    choose_rows,
    take_rows,
)


def _unit_direction(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((v**2).sum() for v in d.values()))
    return {n: v / norm for n, v in d.items()}


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _central_difference(model, params, direction, x, h=1e-5):
    """Independent reference: write θ ± h v into a copy of the live module and call it."""
    twin = copy.deepcopy(model)
    outs = []
    for sign in (1, -1):
        with torch.no_grad():
            for name, p in twin.named_parameters():
                p.copy_(params[name] + sign * h * direction[name])
            outs.append(copy.deepcopy(twin)(x))  # a fresh copy per call: running stats never carry over
    return (outs[0] - outs[1]) / (2 * h)


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_linear_model_slopes_are_dW_x_plus_db(method):
    torch.manual_seed(0)
    model = nn.Linear(6, 4).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    v = _unit_direction(model)
    out = LogitProbe(model)(_params(model), v, x, method)
    expected = x @ v["weight"].T + v["bias"]
    assert out.method == method
    torch.testing.assert_close(out.slopes, expected, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(out.logits, model(x).detach(), rtol=1e-7, atol=1e-9)


def test_jvp_and_fd_agree_on_a_smooth_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 3)).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    probe, v, theta = LogitProbe(model), _unit_direction(model, 1), _params(model)
    jvp = probe(theta, v, x, "jvp")
    fd = probe(theta, v, x, "fd")
    torch.testing.assert_close(jvp.slopes, fd.slopes, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(jvp.slopes, _central_difference(model, theta, v, x), rtol=1e-7, atol=1e-9)


def test_probe_is_taken_at_the_given_parameters_not_the_live_ones():
    torch.manual_seed(2)
    model = nn.Linear(4, 3).double()
    theta0 = _params(model)
    with torch.no_grad():
        model.weight.add_(1.0)  # the live module has moved on (as after the inner step)
    x = torch.randn(5, 4, dtype=torch.float64)
    out = LogitProbe(model)(theta0, _unit_direction(model), x)
    torch.testing.assert_close(out.logits, x @ theta0["weight"].T + theta0["bias"])


def _bn_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()


def test_batchnorm_train_mode_uses_batch_statistics_and_keeps_running_stats():
    torch.manual_seed(3)
    model = _bn_net().train()
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    theta, v = _params(model), _unit_direction(model, 3)
    probe = LogitProbe(model)
    assert probe.uses_batch_statistics()
    out = probe(theta, v, x, "jvp")
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    torch.testing.assert_close(out.logits, copy.deepcopy(model)(x).detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.slopes, _central_difference(model, theta, v, x), rtol=1e-6, atol=1e-8)
    eval_slopes = probe(theta, v, x, "jvp").slopes
    model.eval()
    assert not probe.uses_batch_statistics()
    assert not torch.allclose(probe(theta, v, x, "jvp").slopes, eval_slopes)  # the mode matters, and is kept


def test_dropout_is_disabled_and_rng_untouched():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).double().train()
    x = torch.randn(10, 5, dtype=torch.float64)
    theta, v = _params(model), _unit_direction(model, 4)
    rng = torch.get_rng_state()
    out = LogitProbe(model)(theta, v, x, "jvp")
    assert torch.equal(torch.get_rng_state(), rng)
    assert model[2].training  # restored
    deterministic = copy.deepcopy(model).eval()
    torch.testing.assert_close(out.logits, deterministic(x).detach())
    w1, w2 = theta["0.weight"], theta["3.weight"]
    h = x @ w1.T + theta["0.bias"]
    dh = x @ v["0.weight"].T + v["0.bias"]
    expected = (torch.relu(h) @ v["3.weight"].T + v["3.bias"]) + ((h > 0) * dh) @ w2.T
    torch.testing.assert_close(out.slopes, expected)


class _SelfGatedDropout(nn.Module):
    """Attention-style dropout read from the module's own training flag (as Hugging Face layers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return torch.nn.functional.dropout(self.fc(x), p=0.5, training=self.training)


def test_dropout_read_from_a_modules_training_flag_is_off_and_torch_transformers_keep_jvp():
    torch.manual_seed(5)
    model = _SelfGatedDropout().double().train()
    x = torch.randn(6, 5, dtype=torch.float64)
    theta, v = _params(model), _unit_direction(model, 5)
    out = LogitProbe(model)(theta, v, x, "jvp")
    assert model.training  # restored
    torch.testing.assert_close(out.logits, x @ theta["fc.weight"].T + theta["fc.bias"])
    torch.testing.assert_close(out.slopes, x @ v["fc.weight"].T + v["fc.bias"])
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True).double().train()
    tokens = torch.randn(3, 4, 8, dtype=torch.float64)
    probe = LogitProbe(layer)
    out = probe(_params(layer), _unit_direction(layer, 6), tokens, "auto")
    assert out.method == "jvp"  # eval mode would select torch's fused fast path, which has no forward-AD rule
    torch.testing.assert_close(out.logits, copy.deepcopy(layer).eval()(tokens).detach())


def test_attention_jvp_uses_a_kernel_with_forward_ad_and_drops_attention_dropout():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True)
    model = nn.Sequential(layer, nn.Linear(16, 5)).train()
    x = torch.randn(3, 4, 16)
    theta, v = _params(model), _unit_direction(model, 5)
    probe = LogitProbe(model)
    out = probe(theta, v, x, "jvp")
    assert out.logits.shape == (3, 4, 5) and layer.self_attn.dropout == 0.3 and layer.dropout1.training
    again = probe(theta, v, x, "jvp")
    assert torch.equal(out.slopes, again.slopes)  # deterministic: no dropout masks
    fd = probe(theta, v, x, "fd")
    torch.testing.assert_close(out.slopes, fd.slopes, rtol=2e-2, atol=2e-3)


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4).double()

    def forward(self, x):
        return _NoForwardAD.apply(self.lin(x))


def test_auto_falls_back_to_finite_differences():
    torch.manual_seed(6)
    model = _Custom()
    x = torch.randn(5, 3, dtype=torch.float64)
    theta, v = _params(model), _unit_direction(model, 6)
    probe = LogitProbe(model)
    with pytest.raises(ValueError, match="method='jvp' cannot probe this model.*jvp function"):
        probe(theta, v, x, "jvp")
    assert probe.fallback == ""  # an explicit "jvp" never switches the method
    with pytest.warns(RuntimeWarning, match="no forward-mode AD rule"):
        out = probe(theta, v, x, "auto")
    assert out.method == "fd" and "no forward-mode AD rule" in out.note
    torch.testing.assert_close(out.slopes, 2 * (x @ v["lin.weight"].T + v["lin.bias"]), rtol=1e-7, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the next probes fall back silently
        again = probe(theta, v, x, "auto")
    assert again.method == "fd" and again.note == ""


class _Failing(nn.Module):
    """A model whose forward raises a RuntimeError that is not about forward-mode AD (e.g. out of memory)."""

    def __init__(self, message):
        super().__init__()
        self.lin = nn.Linear(3, 4).double()
        self.message = message

    def forward(self, x):
        raise RuntimeError(self.message)


@pytest.mark.parametrize("message", ["CUDA out of memory. Tried to allocate 2.00 GiB", "shape mismatch in matmul"])
def test_auto_never_hides_other_errors(message):
    model = _Failing(message)
    probe = LogitProbe(model)
    with pytest.raises(RuntimeError, match=message.split(".")[0]):
        probe(_params(model), _unit_direction(model), torch.randn(2, 3, dtype=torch.float64), "auto")
    assert probe.fallback == ""  # the method did not switch for the rest of training


def test_no_autograd_state_is_left_behind():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(6, 4)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    for method in ("jvp", "fd"):
        out = LogitProbe(model)(_params(model), _unit_direction(model), x, method)
        assert not out.logits.requires_grad and not out.slopes.requires_grad
        assert out.logits.grad_fn is None and out.slopes.grad_fn is None
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


class _TinyLM(nn.Module):
    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, vocab)

    def forward(self, input_ids, scale=1.0):
        return {"logits": self.out(self.emb(input_ids)) * scale}


def test_sequence_logits_through_dict_inputs_and_logits_fn():
    torch.manual_seed(8)
    model = _TinyLM().double()
    ids = torch.randint(0, 11, (3, 5))
    theta, v = _params(model), _unit_direction(model, 8)
    out = LogitProbe(model)(theta, v, {"input_ids": ids, "scale": 2.0}, "jvp")
    assert out.slopes.shape == (3, 5, 11)
    e, de = theta["emb.weight"][ids], v["emb.weight"][ids]
    expected = 2.0 * (e @ v["out.weight"].T + v["out.bias"] + de @ theta["out.weight"].T)
    torch.testing.assert_close(out.slopes, expected)
    custom = LogitProbe(model, logits_fn=lambda m, inp: m(inp)["logits"][:, -1])
    assert custom(theta, v, ids, "jvp").slopes.shape == (3, 11)
    bad = LogitProbe(model, logits_fn=lambda m, inp: m(inp)["logits"].argmax(-1))
    with pytest.raises(ValueError, match="floating"):
        bad(theta, v, ids, "fd")


def test_extract_logits_forms_and_error():
    t = torch.zeros(2, 3)

    class Out:
        logits = t

    assert extract_logits(t) is t and extract_logits(Out()) is t
    assert extract_logits({"logits": t}) is t and extract_logits((t, 1)) is t
    with pytest.raises(ValueError, match="logits_fn"):
        extract_logits("nope")


def test_rows_and_batch_helpers():
    assert choose_rows(128, 16, None, 0).tolist() == list(range(0, 128, 8))
    assert choose_rows(128, 16, None, 3).tolist() == list(range(3, 128, 8))  # the stride rotates with the step
    assert choose_rows(10, 4, None, 0).tolist() == [0, 2, 5, 7]
    assert choose_rows(10, 10, None, 0) is None
    x, mask = torch.arange(10).view(5, 2), torch.ones(5, 3)
    rows = torch.tensor([1, 3])
    call = take_rows(CallArgs((x,), {"mask": mask, "flag": 3}), rows, 5)
    assert call.args[0].tolist() == [[2, 3], [6, 7]] and call.kwargs["mask"].shape == (2, 3)
    assert call.kwargs["flag"] == 3
    assert take_rows((x, torch.zeros(7)), rows, 5)[1].shape == (7,)  # not a batch tensor: untouched
    assert batch_size({"a": 1, "b": x}) == 5
    with pytest.raises(ValueError, match="batch"):
        batch_size((1, 2))


def test_input_capture_keeps_the_last_training_call():
    model = nn.Linear(3, 2)
    capture = InputCapture(model)
    a, b = torch.randn(4, 3), torch.randn(2, 3)
    model(a)
    with torch.no_grad():
        model(b)  # evaluation: ignored
    with capture.paused():
        model(b)
    call = capture.pop()
    assert call.args[0] is a and call.kwargs == {} and capture.pop() is None
    model(b)
    assert capture.pop().args[0] is b
    capture.remove()
    model(a)
    assert capture.pop() is None


def test_invalid_method_and_mismatched_direction():
    model = nn.Linear(2, 2)
    probe = LogitProbe(model)
    with pytest.raises(ValueError, match="method"):
        probe(_params(model), _unit_direction(model), torch.ones(1, 2), "exact")
    with pytest.raises(ValueError, match="same tensors"):
        probe(_params(model), {"weight": torch.ones(2, 2)}, torch.ones(1, 2))


def test_direction_with_a_wrong_shape_is_rejected_and_auto_stays_on_jvp():
    model = nn.Linear(3, 2).double()
    probe, theta = LogitProbe(model), _params(model)
    bad = {**_unit_direction(model), "weight": torch.ones(3, 2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="shape for weight"):
        probe(theta, bad, torch.ones(4, 3, dtype=torch.float64), "auto")
    assert probe(theta, _unit_direction(model), torch.ones(4, 3, dtype=torch.float64)).method == "jvp"


def test_slopes_are_zero_when_the_probed_tensors_do_not_reach_the_logits():
    torch.manual_seed(9)
    model = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 3)}).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    logits_fn = lambda m, inp: m["used"](inp)  # noqa: E731
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("unused")}
    v = {n: torch.ones_like(t) for n, t in theta.items()}
    out = LogitProbe(model, logits_fn)(theta, v, x, "jvp")
    assert out.method == "jvp" and torch.equal(out.slopes, torch.zeros(5, 3, dtype=torch.float64))
    torch.testing.assert_close(out.logits, model["used"](x).detach())


def _cycle_garbage(call):
    """Objects that only the cycle collector would free, created by ``call()`` (after one warm-up call).

    Earlier garbage is collected first, until a pass frees nothing: a pass may free objects whose finalizers release
    the last outside reference to more cycles (an earlier test's figure), which only the next pass frees."""
    call()
    while gc.collect():
        pass
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        call()
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_probe_creates_no_reference_cycles(method):
    torch.manual_seed(10)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(3 * 8, 4)).train()
    theta, v, x = _params(model), _unit_direction(model, 10), torch.randn(5, 3, 8)
    probe = LogitProbe(model)
    assert _cycle_garbage(lambda: probe(theta, v, x, method)) == []


def test_failed_jvp_closes_its_forward_ad_level_and_leaves_no_cycles():
    torch.manual_seed(11)
    model = _Custom()
    x = torch.randn(5, 3, dtype=torch.float64)
    theta, v = _params(model), _unit_direction(model, 11)

    def fall_back():
        assert LogitProbe(model)(theta, v, x, "auto").method == "fd"

    assert _cycle_garbage(fall_back) == []
    with forward_ad.dual_level():  # raises "nested forward mode AD" if the probe left its level open
        dual = forward_ad.make_dual(torch.ones(2), torch.full((2,), 3.0))
        assert torch.equal(forward_ad.unpack_dual(dual * 2).tangent, torch.full((2,), 6.0))
