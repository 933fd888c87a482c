"""SafeStep in OLMo-core's own Trainer: ``SafeStepConfig`` as the train module's optimizer config and
``SafeStepCallback`` for the metrics, on 2 gloo ranks on CPU with FSDP2 (``TransformerDataParallelConfig(name="fsdp")``),
a tiny Llama-like ``Transformer`` built from its config and a token file read by OLMo-core's own numpy data loader."""
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

pytest.importorskip("olmo_core.train", reason="OLMo-core is not installed: pip install ai2-olmo-core")
from _ranks import WORLD, full_flat, spawn  # noqa: E402
from olmo_core.data import NumpyDataLoaderConfig, NumpyFSLDatasetConfig, TokenizerConfig  # noqa: E402
from olmo_core.distributed.parallel import DataParallelType  # noqa: E402
from olmo_core.nn.transformer import TransformerConfig  # noqa: E402
from olmo_core.optim import AdamWConfig, ConstantScheduler  # noqa: E402
from olmo_core.train import Duration, TrainerConfig, prepare_training_environment  # noqa: E402
from olmo_core.train.callbacks import Callback  # noqa: E402
from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModuleConfig  # noqa: E402

from safestep import SafeStep  # noqa: E402
from safestep.probe import CallArgs  # noqa: E402
from safestep.integrations import unwrap_safestep  # noqa: E402
from safestep.integrations.olmo_core import SafeStepCallback, SafeStepConfig, olmo_labels, olmo_logits_fn  # noqa: E402

VOCAB, SEQ, RANK_BATCH, STEPS = 64, 16, 4, 3
KEYS = ("tau", "rho", "r_proposed", "scale", "r_applied", "capped", "skipped")


class FullUpdates:
    """‖θ_after − θ_before‖ over the gathered parameters around every optimizer step (a step pre/post hook pair)."""

    def __init__(self, optimizer, model):
        self.model, self.before, self.applied = model, None, []
        optimizer.register_step_pre_hook(lambda *_: setattr(self, "before", full_flat(model)))
        optimizer.register_step_post_hook(lambda *_: self.applied.append((full_flat(model) - self.before).norm().item()))


@dataclass
class MetricsSpy(Callback):
    """The metrics the Trainer hands its loggers (W&B, Comet, the console), per step."""

    logged: dict = field(default_factory=dict)

    def log_metrics(self, step, metrics):
        self.logged.setdefault(step, {}).update(metrics)


def _tokens(path):
    np.random.default_rng(0).integers(0, VOCAB - 1, 64 * SEQ, dtype=np.uint16).tofile(path)


def _fit(out_dir, steps):
    """Build model, train module (SafeStepConfig around AdamW at lr = 1, FSDP2), data loader and Trainer, and fit.

    The Trainer checkpoints before the first step and at the end; a second call resumes from the latest checkpoint."""
    model = TransformerConfig.llama_like(d_model=16, vocab_size=VOCAB, n_layers=2, n_heads=2).build(init_device="cpu")
    train_module = TransformerTrainModuleConfig(
        rank_microbatch_size=RANK_BATCH * SEQ // 2,  # two micro-batches per step: gradient accumulation
        max_sequence_length=SEQ,
        optim=SafeStepConfig(optim=AdamWConfig(lr=1.0, weight_decay=0.1)),
        scheduler=ConstantScheduler(),
        dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp),
    ).build(model, device=torch.device("cpu"))
    tokenizer = TokenizerConfig(vocab_size=VOCAB, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1)
    dataset = NumpyFSLDatasetConfig(paths=[f"{out_dir}/tokens.npy"], tokenizer=tokenizer, sequence_length=SEQ,
                                    work_dir=f"{out_dir}/work").build()
    loader = NumpyDataLoaderConfig(global_batch_size=WORLD * RANK_BATCH * SEQ, seed=0, work_dir=f"{out_dir}/work").build(
        dataset, dp_process_group=train_module.dp_process_group)
    trainer = (TrainerConfig(save_folder=f"{out_dir}/run", max_duration=Duration.steps(steps), metrics_collect_interval=1)
               .with_callback("safestep", SafeStepCallback()).with_callback("metrics", MetricsSpy())
               .build(train_module, loader))
    guard = unwrap_safestep(train_module.optim)
    updates = FullUpdates(guard, train_module.model)
    trainer.fit()
    return trainer, train_module, guard, updates


def _olmo_fsdp2(rank, out_dir):
    warnings.filterwarnings("ignore")
    prepare_training_environment(seed=0, backend="gloo")  # on a CPU-only machine: gloo alone
    if rank == 0:
        _tokens(f"{out_dir}/tokens.npy")
    torch.distributed.barrier()
    trainer, train_module, guard, updates = _fit(out_dir, STEPS)
    result = {
        "guard": (type(train_module.optim).__name__, type(guard.optimizer).__name__, guard.labels_fn is olmo_labels,
                  guard.probe.__class__.__name__),
        "sharded": sorted({type(p).__name__ for p in train_module.model.parameters()}),
        "reports": [(r.tau, r.rho, r.scale, r.method, r.skipped) for r in guard.history],
        "applied": updates.applied,
        "metrics": trainer.callbacks["metrics"].logged,
        "params": full_flat(train_module.model),
        "adam_steps": sorted({float(state["step"]) for state in guard.state.values()}),
    }
    return result


def _olmo_fsdp2_resumed(rank, out_dir):
    """A new process group (OLMo-core builds one world mesh per process): resume from the last checkpoint, one step."""
    warnings.filterwarnings("ignore")
    prepare_training_environment(seed=0, backend="gloo")
    _, _, guard, _ = _fit(out_dir, STEPS + 1)
    return guard.steps, [r.step for r in guard.history], sorted({float(state["step"]) for state in guard.state.values()})


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """One FSDP2 run of STEPS steps on 2 ranks, then a resumed run of one more step from its last checkpoint.

    The ranks fork from a fork server, not from this process: after any plain SafeStep was built here (any earlier
    test), forked ranks ran every step hook twice (see the regression test below)."""
    tmp = tmp_path_factory.mktemp("olmo_fsdp2")
    first = spawn(_olmo_fsdp2, tmp, init=False, start_method="forkserver")
    return first, spawn(_olmo_fsdp2_resumed, tmp, init=False, start_method="forkserver")


def test_olmo_core_fsdp2_trainer_guards_its_own_adamw_on_the_shards(ranks):
    first, _ = ranks
    for result in first:
        assert result["guard"] == ("OLMoSafeStep", "AdamW", True, "ShardedProbe")
        assert result["sharded"] == ["DTensor"]


def test_olmo_core_fsdp2_every_rank_applies_the_same_capped_scale_within_the_radius(ranks):
    first, _ = ranks
    reports = first[0]["reports"]
    assert len(reports) == STEPS and all(method == "fd" and not skipped for *_, method, skipped in reports)
    assert all(scale < 1.0 for _, _, scale, _, _ in reports)  # AdamW at lr = 1: every step is capped
    for result in first:
        assert result["reports"] == reports  # τ (summed over shards), ρ (MIN over ranks), s: bit for bit
        init, *steps = result["applied"]  # the first step() is the checkpoint's state initialization
        assert init == 0.0
        for (tau, rho, scale, _, _), moved in zip(reports, steps, strict=True):
            assert moved == pytest.approx(scale * tau, rel=1e-4)  # every shard was scaled by the same s
            assert moved <= rho * (1 + 1e-4)  # r = 1: the applied step is at most ρ
        assert result["adam_steps"] == [STEPS + 1.0]  # the initialization counts, as in an unguarded OLMo-core run
    assert torch.equal(first[0]["params"], first[1]["params"])


def test_olmo_core_trainer_metrics_carry_the_guard_statistics(ranks):
    first, _ = ranks
    logged = first[0]["metrics"]
    for step, (tau, rho, scale, _, _) in enumerate(first[0]["reports"], start=1):
        metrics = logged[step]
        assert metrics["safestep/tau"] == tau and metrics["safestep/rho"] == rho and metrics["safestep/scale"] == scale
        assert metrics["safestep/capped"] == 1.0 and metrics["safestep/r_applied"] <= 1.0 + 1e-6
        assert set(f"safestep/{key}" for key in KEYS) <= metrics.keys() and math.isfinite(metrics["train/CE loss"])


def test_olmo_core_checkpoint_resumes_the_guard_counters(ranks):
    _, resumed = ranks
    for steps, history, adam_steps in resumed:
        assert steps == STEPS + 1 and history == [STEPS]  # counters restored from the checkpoint, one more step
        assert adam_steps == [STEPS + 2.0]


# -- single process ------------------------------------------------------------------------------------------
def _transformer():
    torch.manual_seed(0)
    return TransformerConfig.llama_like(d_model=16, vocab_size=VOCAB, n_layers=1, n_heads=2).build(init_device="cpu")


def test_logits_fn_replays_the_train_modules_call_without_the_loss_and_labels_come_from_it():
    model = _transformer()
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    call = CallArgs((ids,), {"labels": labels, "ignore_index": -100, "loss_reduction": "sum", "z_loss_multiplier": None,
                             "loss_div_factor": torch.tensor(30), "return_logits": False})
    with torch.no_grad():
        assert model(*call.args, **call.kwargs).logits is None  # the training call returns losses only
        torch.testing.assert_close(olmo_logits_fn(model, call), model(ids))
    assert olmo_labels(call) is labels and olmo_labels(CallArgs((ids,), {})) is None


def test_config_builds_a_guard_around_the_inner_config_and_checkpoint_init_moves_nothing():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = _transformer()
    guard = SafeStepConfig(optim=AdamWConfig(lr=0.5, weight_decay=0.1), r=0.5, bound="belief").build(model)
    assert isinstance(guard, SafeStep) and type(guard.optimizer).__name__ == "AdamW" and guard.r == 0.5
    assert guard.param_groups[0]["initial_lr"] == 0.5 and guard.labels_fn is olmo_labels
    before = [p.detach().clone() for p in model.parameters()]
    state = get_optimizer_state_dict(model, guard)  # initializes the empty state through step(), as DCP does
    assert state["state"] and guard.steps == 0 and not guard.history
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert guard.param_groups[0]["lr"] == 0.5 and all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="another SafeStepConfig"):
        SafeStepConfig(optim=SafeStepConfig()).build(model)


def test_a_plain_step_without_a_batch_is_still_refused():
    model = _transformer()
    guard = SafeStepConfig(optim=AdamWConfig(lr=0.5)).build(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="no batch to probe"):  # lr ≠ 0: not checkpoint initialization
        guard.step()


def test_step_hooks_run_once_per_step_even_after_a_plain_safestep_was_built():
    """torch wraps each optimizer class's own ``step`` in its hook runner: a subclass that overrode ``step`` and
    called ``super().step()`` ran every hook twice once a plain SafeStep existed (fails on that version)."""
    model = _transformer()
    SafeStep(torch.optim.SGD(model.parameters(), lr=0.0), model)  # torch wraps SafeStep.step (once per process)
    guard = SafeStepConfig(optim=AdamWConfig(lr=0.5)).build(model)
    calls = []
    guard.register_step_post_hook(lambda *_: calls.append("post"))
    model(torch.zeros(1, SEQ, dtype=torch.long)).sum().backward()
    guard.step(inputs=torch.zeros(1, SEQ, dtype=torch.long))
    assert calls == ["post"]
