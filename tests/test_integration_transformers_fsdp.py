"""SafeStep in a Hugging Face Trainer with FSDP2 (``fsdp="full_shard"``): 2 gloo ranks on CPU, a tiny GPT-2 built
from a config, the Trainer's own AdamW and its FSDP config; the guard is built on the sharded model when training
begins and every rank applies the same scale.

accelerate switches FSDP on only for accelerator devices (``AcceleratorState``: the FSDP branch lists MULTI_GPU,
MULTI_XPU, ... but not MULTI_CPU), so on CPU the Trainer would silently fall back to DDP. ``_fsdp_on_cpu`` does on
CPU the two assignments accelerate does there (``distributed_type = FSDP``, ``fsdp_plugin = plugin``); everything
else (the Trainer's optimizer, ``accelerator.prepare``'s ``fully_shard`` and parameter swap, the AcceleratedOptimizer,
gloo collectives) is the real FSDP2 path.
"""
import math
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from _ranks import full_flat, spawn  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from safestep import SafeStep  # noqa: E402
from safestep.integrations import unwrap_safestep  # noqa: E402
from safestep.integrations.transformers import SafeStepTrainerCallback, add_safestep, causal_lm_labels  # noqa: E402

VOCAB, SEQ, BATCH, STEPS = 50, 12, 4, 3


class RandomTokens(torch.utils.data.Dataset):
    """Random token ids, labelled with themselves (the model shifts them), −100 past each sequence's length."""

    def __init__(self, n=64):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
        self.lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].masked_fill(torch.arange(SEQ) >= self.lengths[i], -100)}


class FullUpdates(TrainerCallback):
    """‖θ_after − θ_before‖ of every optimizer step over the gathered (unsharded) parameters."""

    def __init__(self):
        self.before, self.applied = None, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = full_flat(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.applied.append((full_flat(model) - self.before).norm().item())


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0,
                        eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    return GPT2LMHeadModel(config)


def _fsdp_on_cpu():
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=True)  # a forked rank inherits the parent's singletons
    GradientState._reset_state()

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init


def _fsdp2_trainer(rank, out_dir):
    warnings.filterwarnings("ignore")
    _fsdp_on_cpu()
    # a sharded checkpoint at the end (FULL_STATE_DICT saving aborts on CPU/gloo with a collective size mismatch,
    # with or without the guard)
    fsdp_config = {"transformer_layer_cls_to_wrap": ["GPT2Block"], "state_dict_type": "SHARDED_STATE_DICT"}
    args = TrainingArguments(output_dir=out_dir, max_steps=STEPS, per_device_train_batch_size=BATCH, use_cpu=True,
                             fsdp="full_shard", fsdp_config=fsdp_config,
                             learning_rate=1.0, weight_decay=0.1, lr_scheduler_type="constant", max_grad_norm=0.0,
                             logging_steps=1, report_to=[], save_strategy="steps", save_steps=STEPS, disable_tqdm=True)
    updates = FullUpdates()
    trainer = Trainer(model=_gpt2(), args=args, train_dataset=RandomTokens(), callbacks=[updates])
    returned = add_safestep(trainer)
    trainer.train()
    guard = unwrap_safestep(trainer.optimizer)
    return {
        "fsdp": (trainer.is_fsdp_enabled, type(trainer.accelerator.state.fsdp_plugin).__name__),
        "returned": returned,
        "first_callback": type(trainer.callback_handler.callbacks[0]).__name__,
        "guard": (type(guard).__name__, guard.labels_fn is causal_lm_labels, type(guard.optimizer).__name__),
        "sharded": [type(p).__name__ for p in trainer.model.parameters()],
        "reports": [(r.tau, r.rho, r.scale, r.method, r.skipped) for r in guard.history],
        "applied": updates.applied,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "params": full_flat(trainer.model),
        "checkpoint": sorted(path.name for path in Path(out_dir, f"checkpoint-{STEPS}").iterdir()),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_fsdp2_trainer, tmp_path_factory.mktemp("hf_fsdp2"), init=False, start_method="fork")


def test_fsdp2_trainer_builds_the_guard_on_the_sharded_model_at_train_begin(ranks):
    for result in ranks:
        assert result["fsdp"] == (True, "FullyShardedDataParallelPlugin")
        assert result["returned"] is None  # built in train(), after accelerate shards the model
        assert result["first_callback"] == SafeStepTrainerCallback.__name__
        assert result["guard"] == ("SafeStep", True, "AdamW")
        assert set(result["sharded"]) == {"DTensor"}


def test_fsdp2_trainer_every_rank_applies_the_same_capped_scale_within_the_radius(ranks):
    first = ranks[0]["reports"]
    assert len(first) == STEPS and all(method == "fd" and not skipped for *_, method, skipped in first)
    assert all(scale < 1.0 for _, _, scale, _, _ in first)  # AdamW at lr = 1: every step is capped
    for result in ranks:
        assert result["reports"] == first  # τ (summed over shards), ρ (MIN over ranks), s: bit for bit
        for (tau, rho, scale, _, _), moved in zip(result["reports"], result["applied"], strict=True):
            assert moved == pytest.approx(scale * tau, rel=1e-4)  # every shard was scaled by the same s
            assert moved <= rho * (1 + 1e-4)  # r = 1: the applied step is at most ρ
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


def test_fsdp2_trainer_saves_its_sharded_checkpoint_with_the_guard(ranks):
    assert {"optimizer_0", "pytorch_model_fsdp_0", "scheduler.pt", "trainer_state.json"} <= set(ranks[0]["checkpoint"])


def test_fsdp2_trainer_logs_the_guard_statistics(ranks):
    logs = ranks[0]["logs"]
    assert len(logs) == STEPS and all(math.isfinite(entry["loss"]) for entry in logs)
    for entry, (tau, rho, scale, _, _) in zip(logs, ranks[0]["reports"], strict=True):
        assert entry["safestep/tau"] == tau and entry["safestep/scale"] == scale and entry["safestep/capped"] == 1.0
        assert entry["safestep/r_applied"] <= 1.0 + 1e-9


def test_fsdp1_and_deepspeed_trainers_are_refused_with_the_fix(tmp_path):
    model = _gpt2()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                      train_dataset=RandomTokens())
    trainer.is_fsdp_enabled = True  # an FSDP Trainer whose plugin is not version 2 (FSDP needs several processes)
    with pytest.raises(ValueError, match=r"FSDP2 only.*'version': 2"):
        add_safestep(trainer)
    trainer.is_fsdp_enabled, trainer.is_deepspeed_enabled = False, True
    with pytest.raises(ValueError, match="DeepSpeed.*FSDP2"):
        add_safestep(trainer)
    assert trainer.optimizer is None and not any(isinstance(c, SafeStepTrainerCallback)
                                                 for c in trainer.callback_handler.callbacks)
    assert not isinstance(trainer.optimizer, SafeStep)
