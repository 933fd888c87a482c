"""SafeStep as a DeepSpeed engine's client optimizer: ZeRO stage 0 in fp32 on 2 gloo ranks on CPU (DeepSpeed's CPU
accelerator), against one process on the concatenated batch; every configuration in which the engine steps the
optimizer on partitions or master copies (ZeRO 1–3, fp16, bf16, a config optimizer) is refused with the reason.

The two-rank test needs ``deepspeed`` (``pip install deepspeed``; on CPU, ``DS_ACCELERATOR=cpu``) and is marked slow:
the first ``deepspeed.init_distributed`` on a machine JIT-compiles DeepSpeed's shared-memory communication op
(about 3.5 minutes on 2 cores, then cached in ~/.cache/torch_extensions).
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from _ranks import (
    ROWS,
    capping_sgd,
    full_flat,
    one_process_reference,
    rank_shard,
    spawn,
    tiny_mlp,
)

from safestep.integrations.deepspeed import check_config, safestep_initialize

STEPS = 3



def _zero0(rank, out_dir):
    os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    model = tiny_mlp()
    config = {"train_micro_batch_size_per_gpu": ROWS, "zero_optimization": {"stage": 0}}
    engine, guard, _, _ = safestep_initialize(model=model, optimizer=capping_sgd(model.parameters()), config=config,
                                              safestep={"probe_size": None})
    x, y = rank_shard(rank)
    applied = []
    for _ in range(STEPS):
        before = full_flat(model)
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
        applied.append((full_flat(model) - before).norm().item())
    refused = None
    try:
        safestep_initialize(model=tiny_mlp(), optimizer=capping_sgd(tiny_mlp().parameters()), config={"zero_optimization": {"stage": 2}})
    except ValueError as error:
        refused = str(error)
    return {"engine": type(engine).__name__, "guard": type(guard).__name__,
            "reports": [(r.tau, r.rho, r.scale, r.method) for r in guard.history], "applied": applied,
            "params": full_flat(model), "refused": refused}


@pytest.mark.slow
def test_zero_stage0_every_rank_applies_the_scale_of_one_process_on_the_concatenated_batch(tmp_path):
    pytest.importorskip("deepspeed")
    ranks = spawn(_zero0, tmp_path, init=False, start_method="fork", timeout=400.0)
    model, expected = one_process_reference(STEPS)
    assert min(scale for *_, scale in expected) < 0.5  # the cap binds
    for result in ranks:
        assert (result["engine"], result["guard"]) == ("DeepSpeedEngine", "SafeStep")
        assert result["reports"] == ranks[0]["reports"]  # every rank: the same τ, ρ and s, bit for bit
        for (tau, rho, scale, _), moved, (_, ref_rho, ref_scale) in zip(result["reports"], result["applied"], expected,
                                                                     strict=True):
            assert (rho, scale) == pytest.approx((ref_rho, ref_scale), rel=1e-5)
            assert moved == pytest.approx(scale * tau, rel=1e-5) and moved <= rho * (1 + 1e-5)
        torch.testing.assert_close(result["params"], full_flat(model), rtol=1e-5, atol=1e-6)
        assert "ZeRO stage 2" in result["refused"] and "FSDP2" in result["refused"]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


@pytest.mark.parametrize("config, match", [
    ({"zero_optimization": {"stage": 1}}, "ZeRO stage 1 partitions"),
    ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3 partitions"),
    ({"zero_optimization": {"stage": "auto"}}, "ZeRO stage auto partitions"),
    ({"bf16": {"enabled": True}}, "bf16 mode steps the wrapped optimizer on fp32 master copies"),
    ({"fp16": {"enabled": True}}, "fp16 mode"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "builds its own optimizer"),
])
def test_configurations_that_step_other_tensors_are_refused_before_the_engine(config, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        check_config(config)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    model = tiny_mlp()
    with pytest.raises(ValueError, match=match):  # a JSON path too; nothing is built, deepspeed is not imported
        safestep_initialize(model=model, optimizer=capping_sgd(model.parameters()), config=str(path))


def test_zero_stage0_in_fp32_passes_the_check():
    assert check_config({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 0},
                         "bf16": {"enabled": False}}) is None
