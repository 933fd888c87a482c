"""Inputs as users write them (issue 16's thirteen cases): each test failed before the one-functional-step rework."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from safestep import Belief, Ghost, SafeStep

from _small import small_data, small_mlp

VOCAB, WIDTH = 11, 8


class _TokenModel(nn.Module):
    """(B, T) tokens → (B, T, V) logits; token 0 is padding (a zero embedding: its logits are 0 and do not move)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, tokens, positions=None):
        h = self.emb(tokens)
        if positions is not None:  # (T,) positions shared by every row, as HF models take position_ids
            h = h + 0.1 * positions.float().unsqueeze(-1)
        return self.head(torch.tanh(h))


def _tokens(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def _lm_step(model, opt, tokens, labels, **step):
    opt.zero_grad()
    logits = model(tokens)
    F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100).backward()
    opt.step(labels=labels, **step)
    return opt.last_report


def _ghost_over_rows(model, opt_factory, tokens, labels):
    """ρ of the same first step probed over the whole batch (an independent twin run)."""
    twin = _TokenModel()
    twin.load_state_dict(model.state_dict())
    guard = SafeStep(opt_factory(twin), twin, probe_size=None, mode="monitor")
    return _lm_step(twin, guard, tokens, labels).rho


@pytest.mark.parametrize("select", ["mixed", "stride"])
def test_padding_rows_are_never_probed_while_rows_in_the_loss_are_left(select):
    tokens, labels = _tokens(16, 6), _tokens(16, 6, seed=2)
    tokens[0::8] = 0  # the stride's rows on step 0 (rows 0 and 8) are all padding ...
    labels[0::8] = -100  # ... and outside the loss
    model = _TokenModel()
    whole = _ghost_over_rows(model, lambda m: torch.optim.SGD(m.parameters(), lr=30.0), tokens, labels)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=30.0), model, probe_size=2, probe_select=select)
    before = [p.detach().clone() for p in model.parameters()]
    report = _lm_step(model, opt, tokens, labels)
    moved = math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in zip(model.parameters(), before)))
    assert math.isfinite(report.rho) and report.rho >= whole * (1 - 1e-9)  # a subset of the active rows
    assert report.capped and moved <= report.rho * (1 + 1e-6)


def test_an_empty_batch_is_refused_before_anything_moves():
    model = small_mlp(5)
    x, y = small_data(32, 5)
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    F.cross_entropy(model(x), y).backward()
    opt.step(labels=y)
    opt.zero_grad()
    model(x[:0]).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="batch is empty"):
        opt.step(labels=y[:0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert [int(s["step"]) for s in opt.optimizer.state.values()] == [1] * len(before) and opt.steps == 1


def test_a_compiled_model_is_probed_through_its_original_module():
    x, y = small_data(32, 5)
    plain, compiled_source = small_mlp(5, seed=3), small_mlp(5, seed=3)
    compiled = torch.compile(compiled_source)
    reports = []
    for model in (plain, compiled):
        opt = SafeStep(torch.optim.SGD(model.parameters(), lr=5.0), model, probe_size=None)
        F.cross_entropy(model(x), y).backward()
        opt.step(labels=y)
        reports.append(opt.last_report)
    assert reports[1].rho == pytest.approx(reports[0].rho, rel=1e-5) and reports[1].rows_probed == 32
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(plain.parameters(), compiled_source.parameters()))


def test_loading_the_inner_optimizers_state_after_wrapping_keeps_stepping():
    model = small_mlp(5)
    x, y = small_data(32, 5)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = SafeStep(inner, model)
    inner.load_state_dict(torch.optim.Adam(model.parameters(), lr=1e-3).state_dict())  # a plain optimizer's state
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(labels=y)
    assert opt.steps == 2 and inner.param_groups[0]["lr"] == 1e-3 and not opt.last_report.skipped


class _Growing(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.extra = None

    def forward(self, x):
        z = self.body(x)
        return z if self.extra is None else z + self.extra(x)


def test_a_group_added_from_a_generator_trains_even_for_a_module_attached_later():
    model = _Growing()
    x, y = torch.randn(32, 6), torch.randint(0, 5, (32,))
    opt = SafeStep(torch.optim.SGD(model.body.parameters(), lr=0.1), model)
    model.extra = nn.Linear(6, 5)  # attached after the guard was built
    opt.add_param_group({"params": model.extra.parameters()})  # a generator
    before = model.extra.weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step(labels=y)
    assert len(opt.param_groups[1]["params"]) == 2 and not opt.last_report.skipped
    assert not torch.equal(model.extra.weight, before)


@pytest.mark.parametrize("mode", ["cap", "set"])
def test_a_zero_learning_rate_reports_no_nan(mode):
    model = small_mlp(5)
    x, y = small_data(32, 5)
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.0), model, mode=mode)
    F.cross_entropy(model(x), y).backward()
    opt.step(labels=y)
    report = opt.last_report
    assert report.tau == 0.0 and report.rho == math.inf and report.r_proposed == 0.0 and report.r_applied == 0.0
    assert not report.skipped and "zero update" in report.reason


def test_position_ids_shared_by_every_row_are_not_sliced_as_batch_rows():
    tokens, labels = _tokens(8, 8), _tokens(8, 8, seed=2)  # B == T: (T,) positions look like per-row data
    positions = torch.arange(8)
    reports = []
    for probe_size in (1, None):
        model = _TokenModel()
        opt = SafeStep(torch.optim.SGD(model.parameters(), lr=5.0), model, probe_size=probe_size)
        F.cross_entropy(model(tokens, positions).reshape(-1, VOCAB), labels.reshape(-1)).backward()
        opt.step(labels=labels)
        reports.append(opt.last_report)
    assert reports[0].rows_probed == 8 and reports[0].rho == pytest.approx(reports[1].rho, rel=1e-12)
    assert "cannot be told from positions" in reports[0].reason


class _MaskedRows(nn.Module):
    """Rows flagged by the second input have every logit at −inf (action-masked padding)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(6, 5)

    def forward(self, x, padded):
        return self.net(x).masked_fill(padded.unsqueeze(-1), -math.inf)


@pytest.mark.parametrize("bound", [Belief(), Ghost(aggregate=0.9), Belief(aggregate=0.5)])
def test_ignored_rows_whose_logits_are_all_masked_drop_out_of_every_bound(bound):
    model = _MaskedRows()
    x, padded = torch.randn(16, 6), torch.zeros(16, dtype=torch.bool)
    padded[::3] = True
    y = torch.randint(0, 5, (16,)).masked_fill(padded, -100)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=1.0), model, bound=bound, probe_size=None)
    F.cross_entropy(model(x, padded)[~padded], y[~padded]).backward()
    opt.step(labels=y)
    assert math.isfinite(opt.last_report.rho) and not opt.last_report.skipped


class _Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, 16)
        self.emb.weight.requires_grad_(False)  # frozen: the checkpoint's input carries no tangent
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, VOCAB)
        self.head.requires_grad_(False)  # only the checkpointed block trains
        # what transformers' enable_input_require_grads does, so a reentrant checkpoint after frozen embeddings trains
        self.emb.register_forward_hook(lambda module, args, output: output.requires_grad_(True))

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + checkpoint(self.block, h, use_reentrant=True)
        return self.head(h)


def test_reentrant_activation_checkpointing_keeps_the_blocks_tangent():
    tokens, labels = _tokens(4, 6), _tokens(4, 6, seed=2)
    rhos = {}
    for method in ("jvp", "fd"):
        model = _Checkpointed()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = SafeStep(torch.optim.SGD(trainable, lr=3.0), model, method=method, probe_size=None, mode="monitor")
        F.cross_entropy(model(tokens).reshape(-1, VOCAB), labels.reshape(-1)).backward()
        opt.step(labels=labels)
        rhos[method] = opt.last_report.rho
    assert math.isfinite(rhos["fd"])
    assert rhos["jvp"] == pytest.approx(rhos["fd"], rel=1e-3)  # the finite difference sees the whole function


def test_a_forward_that_returns_a_loss_says_what_it_returned():
    class LossOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(6, 5)

        def forward(self, x, y):
            return F.cross_entropy(self.net(x), y)

    model = LossOnly()
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model(x, y).backward()
    with pytest.raises(ValueError, match=r"returned a 0-dim tensor \(a loss\?\).*logits_fn"):
        opt.step()


def test_nanogpt_style_last_position_logits_get_a_message_saying_what_to_pass():
    class LastOnly(_TokenModel):
        def forward(self, tokens, targets=None):
            logits = super().forward(tokens)
            return logits if targets is not None else logits[:, [-1]]

    model = LastOnly()
    tokens, labels = _tokens(4, 6), _tokens(4, 6, seed=2)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model)
    F.cross_entropy(model(tokens, labels).reshape(-1, VOCAB), labels.reshape(-1)).backward()
    with pytest.raises(ValueError, match=r"logits for 1 position\(s\) of 6.*inputs=\(x, y\)"):
        opt.step(inputs=tokens, labels=labels)
    opt.step(inputs=(tokens, labels), labels=labels)  # called as in training: every position is probed
    assert math.isfinite(opt.last_report.rho)


def test_r_in_monitor_mode_is_refused_rather_than_ignored():
    model = small_mlp(5)
    with pytest.raises(ValueError, match="r has no effect in mode='monitor'"):
        SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="monitor", r=2.0)


def test_the_belief_bound_keeps_training_when_label_probabilities_underflow():
    torch.manual_seed(0)
    net = nn.Linear(6, 5)
    model = nn.Sequential(net, _Scale(1e4))  # logits around 1e4: most labels' softmax probability is 0 in float32
    x, y = torch.randn(32, 6), torch.randint(0, 5, (32,))
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=1e-6), model, bound="belief", probe_size=None)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(labels=y)
        report = opt.last_report
        assert not report.skipped and report.rho > 0 and math.isfinite(report.r_applied), report.reason


class _Scale(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, z):
        return z * self.factor


def test_a_refused_model_or_optimizer_leaves_no_hook_behind():
    """Validate before you mutate: when the constructor refuses, the model keeps no capture hook."""
    import torch
    from torch import nn

    from safestep import SafeStep

    class NoLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 2)

    model, other = NoLogits(), nn.Linear(3, 2)
    for optimizer in (torch.optim.SGD(other.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)):
        try:
            SafeStep(optimizer, model)
        except ValueError:
            pass
        assert not model._forward_pre_hooks and not model._forward_hooks
        assert all("safestep_steps" not in g for g in optimizer.param_groups)
