"""SafeStep inside a real Hugging Face Trainer (CPU, tiny models built from configs, no downloads)."""
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from torch.func import functional_call, jvp  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from safestep import StepReport  # noqa: E402
from safestep.bounds import make_bound  # noqa: E402
from safestep.integrations import interval_metrics, unwrap_safestep  # noqa: E402
from safestep.integrations.transformers import (  # noqa: E402
    SafeStepTrainerCallback,
    add_safestep,
    causal_lm_labels,
    hf_logits_fn,
    labels_fn_for,
    sequence_labels,
    without_label_keys,
)
from safestep.probe import LogitProbe  # noqa: E402

VOCAB, SEQ, BATCH = 50, 12, 8
KEYS = ("tau", "rho", "r_proposed", "scale", "r_applied", "capped", "skipped", "r_applied_max", "capped_fraction",
        "skipped_fraction", "steps")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(token_id|loss_type).*")
        yield


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids; labels are the ids themselves (causal LM, -100 after each sequence's length: padding) or
    the parity of their sum (classification)."""

    def __init__(self, n=64, causal=False):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
        self.lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=generator)
        self.causal = causal

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        if not self.causal:
            return {"input_ids": ids, "labels": torch.tensor(int(ids.sum()) % 2)}
        return {"input_ids": ids, "labels": ids.masked_fill(torch.arange(SEQ) >= self.lengths[i], -100)}


def _bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=SEQ)
    return BertForSequenceClassification(config)


def _gpt2(dropout=0.1):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
                        eos_token_id=0, attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout)
    return GPT2LMHeadModel(config)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


class UpdateRecorder(TrainerCallback):
    """Independent record of every applied update ‖θ_after − θ_before‖ (over a whole accumulation cycle) and of
    the optimizer the callbacks see."""

    def __init__(self):
        self.before, self.applied, self.optimizer = None, [], None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before, self.optimizer = _flat(model), optimizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.applied.append((_flat(model) - self.before).norm().item())


def _trainer(model, tmp_path, steps, logging_steps=1, optimizers=(None, None), **arguments):
    """A Trainer with its own optimizer and scheduler unless ``optimizers`` is given; an UpdateRecorder attached."""
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH,
                             logging_steps=logging_steps, report_to=[], use_cpu=True, save_strategy="no",
                             max_grad_norm=0.0, disable_tqdm=True, **arguments)
    recorder = UpdateRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(causal=isinstance(model, GPT2LMHeadModel)),
                      optimizers=optimizers, callbacks=[recorder])
    return trainer, recorder


def _logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def _assert_trainer_groups(guard, model, weight_decay):
    """The guard steps the Trainer's groups: weight decay on weights, none on biases and LayerNorm, every parameter once."""
    names = {id(p): name for name, p in model.named_parameters()}
    decay = [(names[id(p)], group["weight_decay"]) for group in guard.param_groups for p in group["params"]]
    assert sorted(name for name, _ in decay) == sorted(names.values())
    exempt = {name for name, _ in decay if name.endswith("bias") or ".ln_" in name or "LayerNorm" in name}
    assert exempt and len(exempt) < len(decay)
    assert all(value == (0.0 if name in exempt else weight_decay) for name, value in decay)


def test_bert_classifier_guarded_through_the_trainers_own_sgd_with_accumulation_and_schedule(tmp_path):
    model = _bert()
    trainer, recorder = _trainer(model, tmp_path, steps=4, logging_steps=2, optim="sgd", learning_rate=0.5,
                                 weight_decay=0.01, lr_scheduler_type="linear", gradient_accumulation_steps=2)
    guard = add_safestep(trainer)
    with_labels = []  # per model call: were labels passed? (the probe's calls must not compute a loss)
    model.register_forward_pre_hook(lambda module, args, kwargs: with_labels.append("labels" in kwargs), with_kwargs=True)
    trainer.train()

    assert type(guard.optimizer) is torch.optim.SGD  # the optim= choice
    _assert_trainer_groups(guard, model, 0.01)
    assert guard.labels_fn is sequence_labels
    assert with_labels.count(True) == 8 and with_labels.count(False) >= 4  # 8 micro-batches; probes via hf_logits_fn
    assert isinstance(trainer.callback_handler.callbacks[0], SafeStepTrainerCallback)
    assert type(recorder.optimizer).__name__ == "AcceleratedOptimizer" and unwrap_safestep(recorder.optimizer) is guard
    # the Trainer's linear schedule drives the guard: built on the wrapped optimizer, decayed to 0 after 4 steps
    assert unwrap_safestep(trainer.lr_scheduler.optimizer) is guard
    assert [entry["learning_rate"] for entry in _logs(trainer)] == pytest.approx([0.375, 0.125])
    assert all(group["lr"] == 0.0 for group in guard.param_groups)
    # one report per optimizer step (8 micro-batches, accumulation 2), each a real, measured update
    assert [r.step for r in guard.history] == [0, 1, 2, 3] and all(r.tau > 0 and r.method == "jvp" for r in guard.history)
    logs = _logs(trainer)
    assert len(logs) == 2 and all(entry["safestep/steps"] == 2 for entry in logs)
    assert all("safestep/" + key in entry for entry in logs for key in KEYS)
    for entry, last in zip(logs, list(guard.history)[1::2]):
        assert entry["safestep/tau"] == last.tau and entry["safestep/rho"] == last.rho
    for report, moved in zip(guard.history, recorder.applied, strict=True):
        assert report.scale * report.tau == pytest.approx(moved, rel=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_gpt2_lm_large_lr_is_capped_and_every_applied_step_stays_within_the_radius(tmp_path, bf16):
    model = _gpt2()
    probe_dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, out: probe_dtypes.append(out.dtype))
    trainer, recorder = _trainer(model, tmp_path, steps=4, learning_rate=1.0, weight_decay=0.1,
                                 lr_scheduler_type="constant", bf16=bf16)
    guard = add_safestep(trainer)
    trainer.train()

    assert isinstance(guard.optimizer, torch.optim.AdamW) and guard.optimizer.defaults["lr"] == 1.0
    _assert_trainer_groups(guard, model, 0.1)
    assert guard.labels_fn is causal_lm_labels
    assert model.config._attn_implementation == "sdpa"
    logs = _logs(trainer)
    assert len(logs) == 4
    assert all(entry["safestep/capped"] == 1.0 for entry in logs)  # AdamW at lr=1 moves every weight by ~1
    assert max(entry["safestep/r_applied"] for entry in logs) <= 1.0 + 1e-9
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    for report, moved in zip(guard.history, recorder.applied, strict=True):
        assert report.method == "jvp"
        assert moved == pytest.approx(report.rho, rel=1e-4)  # capped: applied length = r·ρ with r = 1
    # accelerate autocasts through a patched model.forward, so under bf16 the probe's forward is bf16 too;
    # 4 training forwards, 4 probes and the first step's 2-row preflight
    assert len(probe_dtypes) == 9 and set(probe_dtypes) == {torch.bfloat16 if bf16 else torch.float32}


def _belief_radius(model, theta0, theta1, kwargs, labels):
    """The belief bound over (z, a) computed here: a = J_z(θ0)·v by torch.func.jvp, v = (θ1 − θ0)/‖θ1 − θ0‖."""
    names = [name for name, _ in model.named_parameters()]
    step = [b - a for a, b in zip(theta0, theta1)]
    tau = torch.sqrt(sum((d.double() ** 2).sum() for d in step))

    def logits(*params):
        return functional_call(model, dict(zip(names, params)), args=(), kwargs=kwargs).logits

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        z, a = jvp(logits, tuple(theta0), tuple(step))
    return make_bound("belief", None)(z, a / tau, labels).item()


def test_causal_lm_labels_reach_the_bound_shifted_by_one_position(tmp_path):
    model = _gpt2(dropout=0.0)
    trainer, _ = _trainer(model, tmp_path, steps=2, learning_rate=1e-2)
    guard = add_safestep(trainer, bound="belief", probe_size=None)  # every row probed: the radius is recomputable
    seen = []  # (θ0, the captured call) before each step, θ1 = the inner optimizer's result
    guard.register_step_pre_hook(lambda opt, args, kwargs: seen.append(
        [[p.detach().clone() for p in model.parameters()], opt.capture.latest]))
    guard.optimizer.register_step_post_hook(lambda opt, args, kwargs: seen[-1].append(
        [p.detach().clone() for p in model.parameters()]))
    trainer.train()

    assert len(seen) == len(guard.history) == 2
    for (theta0, call, theta1), report in zip(seen, guard.history):
        inputs = without_label_keys(dict(call.kwargs))
        labels = call.kwargs["labels"]
        assert (labels == -100).any()  # padded positions are ignored rows
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        model.eval()
        expected = _belief_radius(model, theta0, theta1, inputs, shifted)
        unshifted = _belief_radius(model, theta0, theta1, inputs, labels)
        assert report.rho == pytest.approx(expected, rel=1e-3)
        assert abs(unshifted - expected) > 0.01 * expected  # the test tells the two label layouts apart


def test_label_functions_by_hand():
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, -100, -100]])
    assert torch.equal(causal_lm_labels({"input_ids": labels, "labels": labels}),
                       torch.tensor([[6, 7, -100, -100], [2, -100, -100, -100]]))
    shift = torch.tensor([[9, 9, 9, 9]])
    assert causal_lm_labels({"labels": labels, "shift_labels": shift}) is shift
    classes = torch.tensor([0, 1])
    assert sequence_labels({"labels": classes}) is classes
    for batch in ({"labels": torch.tensor([0.5, 1.5])}, {"input_ids": labels}, labels):  # regression, none, a tensor
        assert sequence_labels(batch) is None and causal_lm_labels(batch) is None
    assert labels_fn_for(_gpt2()) is causal_lm_labels and labels_fn_for(_bert()) is sequence_labels


def test_add_safestep_wraps_a_given_optimizer_and_refuses_what_it_cannot_guard(tmp_path):
    model = _bert()
    given = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer, _ = _trainer(model, tmp_path, steps=1, optimizers=(given, None))
    guard = add_safestep(trainer, r=0.5, labels_fn=None)
    assert trainer.optimizer is guard and guard.optimizer is given and guard.r == 0.5 and guard.labels_fn is None
    with pytest.raises(ValueError, match="already a SafeStep"):
        add_safestep(trainer)
    fsdp, _ = _trainer(_bert(), tmp_path, steps=1)
    fsdp.is_fsdp_enabled = True  # an FSDP1 Trainer to add_safestep (FSDP2: test_integration_transformers_fsdp.py)
    with pytest.raises(ValueError, match="FSDP2 only"):
        add_safestep(fsdp)
    assert fsdp.optimizer is None


def test_hf_logits_fn_drops_label_keys_and_the_probe_runs_without_dropout():
    model = _gpt2(dropout=0.5).train()
    ids = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    bad_labels = torch.zeros(7, dtype=torch.long)  # would raise inside the loss if it reached the model
    inputs = {"input_ids": ids, "labels": bad_labels, "num_items_in_batch": torch.tensor(7)}

    probe = LogitProbe(model, hf_logits_fn)
    params = {name: p.detach() for name, p in model.named_parameters()}
    zero = {name: torch.zeros_like(p) for name, p in params.items()}
    first, second = probe(params, zero, inputs, "jvp").logits, probe(params, zero, inputs, "jvp").logits
    assert all(m.training for m in model.modules())  # every training flag restored
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert first.shape == (3, SEQ, VOCAB)
    assert torch.equal(first, second) and torch.allclose(first, expected, atol=1e-6)
    assert without_label_keys(inputs).keys() == {"input_ids"}
    assert without_label_keys((ids,))[0] is ids


def test_interval_metrics_by_hand():
    def report(tau, rho, scale, skipped=False, step=0):
        ratio = tau / rho if rho else math.nan
        return StepReport(tau=tau, rho=rho, r_proposed=ratio, scale=scale, r_applied=0.0 if skipped else scale * ratio,
                          bound="ghost", method="jvp", rows_probed=4, skipped=skipped, seconds=0.0, step=step)

    reports = [report(4.0, 2.0, 0.5), report(math.nan, math.nan, 0.0, skipped=True), report(1.0, 4.0, 1.0)]
    metrics = interval_metrics(reports, prefix="s/")
    assert metrics["s/tau"] == 1.0 and metrics["s/r_proposed"] == 0.25 and metrics["s/r_applied"] == 0.25
    assert metrics["s/r_applied_max"] == 1.0  # 0.5 · 4/2 from the first step; the skipped step applied nothing
    assert metrics["s/capped_fraction"] == pytest.approx(1 / 3) and metrics["s/skipped_fraction"] == pytest.approx(1 / 3)
    assert metrics["s/steps"] == 3.0 and metrics["s/capped"] == 0.0
    with pytest.raises(ValueError, match="at least one report"):
        interval_metrics([])


def test_callback_without_a_guard_raises(tmp_path):
    model = _bert()
    trainer, _ = _trainer(model, tmp_path, steps=1, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    trainer.add_callback(SafeStepTrainerCallback())
    with pytest.raises(ValueError, match="no SafeStep optimizer"):
        trainer.train()


def test_a_warmup_that_starts_at_lr_zero_sends_no_nan_to_the_trackers(tmp_path):
    model = _gpt2(dropout=0.0)
    trainer, _ = _trainer(model, tmp_path, steps=3, optim="adamw_torch", learning_rate=1e-3, warmup_steps=2)
    guard = add_safestep(trainer)
    trainer.train()
    first = guard.history[0] if hasattr(guard.history, "__getitem__") else list(guard.history)[0]
    assert first.tau == 0.0 and "zero update" in first.reason  # the warm-up's first LR is 0
    guard_metrics = [value for entry in trainer.state.log_history for key, value in entry.items()
                     if key.startswith("safestep/")]
    assert guard_metrics and not any(isinstance(v, float) and math.isnan(v) for v in guard_metrics)
