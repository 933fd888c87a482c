"""SafeStep inside a real Hugging Face Trainer (CPU, tiny models built from configs, no downloads)."""
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from safestep.probe import LogitProbe  # noqa: E402
from safestep import SafeStep, StepReport  # noqa: E402
from safestep.integrations import interval_metrics, unwrap_safestep  # noqa: E402
from safestep.integrations.transformers import (  # noqa: E402
    SafeStepTrainerCallback,
    add_safestep_callback,
    hf_logits_fn,
    without_label_keys,
)

VOCAB, SEQ, BATCH = 50, 12, 8
KEYS = ("tau", "rho", "r", "scale", "r_applied", "capped", "skipped", "r_applied_max", "capped_fraction",
        "skipped_fraction", "steps")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(token_id|loss_type).*")
        yield


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids; labels are the ids themselves (causal LM) or the parity of their sum (classification)."""

    def __init__(self, n=64, causal=False):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))
        self.causal = causal

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids.clone() if self.causal else torch.tensor(int(ids.sum()) % 2)}


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
    """Independent record of every applied update ‖θ_after − θ_before‖ and of the optimizer the callbacks see."""

    def __init__(self):
        self.before, self.applied, self.optimizer = None, [], None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before, self.optimizer = _flat(model), optimizer

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.applied.append((_flat(model) - self.before).norm().item())


def _train(model, guard, tmp_path, steps, logging_steps, **arguments):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=BATCH,
                             logging_steps=logging_steps, report_to=[], use_cpu=True, save_strategy="no",
                             max_grad_norm=0.0, disable_tqdm=True, lr_scheduler_type="constant", **arguments)
    recorder = UpdateRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(causal=isinstance(model, GPT2LMHeadModel)),
                      optimizers=(guard, None), callbacks=[recorder])
    callback = add_safestep_callback(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, callback, recorder, logs


def test_bert_classifier_logs_guard_statistics_per_interval(tmp_path):
    model = _bert()
    guard = SafeStep(torch.optim.AdamW(model.parameters(), lr=1e-3), model, logits_fn=hf_logits_fn)
    trainer, callback, recorder, logs = _train(model, guard, tmp_path, steps=4, logging_steps=2)

    assert trainer.callback_handler.callbacks[0] is callback
    assert type(recorder.optimizer).__name__ == "AcceleratedOptimizer" and unwrap_safestep(recorder.optimizer) is guard
    assert model.config._attn_implementation == "sdpa"
    assert [r.method for r in guard.history] == ["jvp"] * 4  # forward-mode AD through SDPA (math kernel)
    assert all(r.probe_size == BATCH for r in guard.history)
    assert len(logs) == 2 and all(entry["safestep/steps"] == 2 for entry in logs)
    assert all("safestep/" + key in entry for entry in logs for key in KEYS)
    for entry, last in zip(logs, list(guard.history)[1::2]):
        assert entry["safestep/tau"] == last.tau and entry["safestep/rho"] == last.rho
    # the guard's s·τ is the update that really moved the parameters (measured independently)
    for report, moved in zip(guard.history, recorder.applied):
        assert report.scale * report.tau == pytest.approx(moved, rel=1e-4)


@pytest.mark.parametrize("bf16", [False, True])
def test_gpt2_lm_large_lr_is_capped_and_every_applied_step_stays_within_the_radius(tmp_path, bf16):
    model = _gpt2()
    guard = SafeStep(torch.optim.AdamW(model.parameters(), lr=1.0), model, logits_fn=hf_logits_fn)
    probe_dtypes = []
    model.lm_head.register_forward_hook(lambda module, args, out: probe_dtypes.append(out.dtype))
    _, _, recorder, logs = _train(model, guard, tmp_path, steps=4, logging_steps=1, bf16=bf16)

    assert model.config._attn_implementation == "sdpa"
    assert len(logs) == 4
    assert all(entry["safestep/capped"] == 1.0 for entry in logs)  # AdamW at lr=1 moves every weight by ~1
    assert max(entry["safestep/r_applied"] for entry in logs) <= 1.0 + 1e-9
    assert all(math.isfinite(entry["loss"]) for entry in logs)
    for report, moved in zip(guard.history, recorder.applied):
        assert report.method == "jvp"
        assert moved == pytest.approx(report.rho, rel=1e-4)  # capped: applied length = r·ρ with r = 1
    # accelerate autocasts through a patched model.forward, so under bf16 the probe's forward is bf16 too
    assert len(probe_dtypes) == 8 and set(probe_dtypes) == {torch.bfloat16 if bf16 else torch.float32}


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
        return StepReport(tau=tau, rho=rho, r=tau / rho if rho else math.nan, scale=scale, bound="ghost",
                          method="jvp", probe_size=4, skipped=skipped, seconds=0.0, step=step)

    reports = [report(4.0, 2.0, 0.5), report(math.nan, math.nan, 0.0, skipped=True), report(1.0, 4.0, 1.0)]
    metrics = interval_metrics(reports, prefix="s/")
    assert metrics["s/tau"] == 1.0 and metrics["s/r"] == 0.25 and metrics["s/r_applied"] == 0.25
    assert metrics["s/r_applied_max"] == 1.0  # 0.5 · 4/2 from the first step; the skipped step applied nothing
    assert metrics["s/capped_fraction"] == pytest.approx(1 / 3) and metrics["s/skipped_fraction"] == pytest.approx(1 / 3)
    assert metrics["s/steps"] == 3.0 and metrics["s/capped"] == 0.0
    with pytest.raises(ValueError, match="at least one report"):
        interval_metrics([])


def test_callback_without_a_guard_raises(tmp_path):
    model = _bert()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(),
                      optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
                      callbacks=[SafeStepTrainerCallback()])
    with pytest.raises(ValueError, match="no SafeStep optimizer"):
        trainer.train()
