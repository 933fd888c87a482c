"""SafeStep with Lightning Fabric: the guard wrapped before ``fabric.setup``, stepped through Fabric's optimizer
wrapper; 2 gloo ranks with the DDP strategy on CPU against one process on the concatenated batch, and one process
under bf16-mixed precision with gradient accumulation."""
import pytest
import torch
import torch.nn.functional as F
from _ranks import (
    WORLD,
    capping_sgd,
    full_flat,
    one_process_reference,
    rank_shard,
    spawn,
    tiny_mlp,
)

pytest.importorskip("lightning")
from lightning.fabric import Fabric  # noqa: E402

from safestep import SafeStep  # noqa: E402
from safestep.integrations import unwrap_safestep  # noqa: E402
from safestep.integrations.lightning import fabric_logits_fn  # noqa: E402

STEPS = 3



def _fabric_ddp(rank, out_dir):
    fabric = Fabric(accelerator="cpu", devices=WORLD, strategy="ddp")  # LOCAL_RANK set: the processes exist
    fabric.launch()
    model = tiny_mlp()
    guard = SafeStep(capping_sgd(model.parameters()), model, probe_size=None)
    model, optimizer = fabric.setup(model, guard)
    x, y = rank_shard(rank)
    applied = []
    for _ in range(STEPS):
        before = full_flat(model)
        optimizer.zero_grad()
        fabric.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        applied.append((full_flat(model) - before).norm().item())
    return {"wrapped": (type(model).__name__, type(model._forward_module).__name__, unwrap_safestep(optimizer) is guard),
            "reports": [(r.tau, r.rho, r.scale, r.method) for r in guard.history], "applied": applied,
            "params": full_flat(model)}


def test_fabric_ddp_every_rank_applies_the_scale_of_one_process_on_the_concatenated_batch(tmp_path):
    ranks = spawn(_fabric_ddp, tmp_path, init=False, start_method="fork")
    model, history = one_process_reference(STEPS)
    expected = [(rho, scale) for _, rho, scale in history]
    assert min(scale for _, scale in expected) < 0.5  # the cap binds
    for result in ranks:
        assert result["wrapped"] == ("_FabricModule", "DistributedDataParallel", True)
        assert result["reports"] == ranks[0]["reports"]  # every rank: the same τ, ρ and s, bit for bit
        for (tau, rho, scale, method), moved, ref in zip(result["reports"], result["applied"], expected, strict=True):
            assert method == "jvp" and (rho, scale) == pytest.approx(ref, rel=1e-5)
            assert moved == pytest.approx(scale * tau, rel=1e-5) and moved <= rho * (1 + 1e-5)
        torch.testing.assert_close(result["params"], full_flat(model), rtol=1e-5, atol=1e-6)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


def test_fabric_bf16_with_gradient_accumulation_steps_the_guard_once_per_optimizer_step():
    fabric = Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    model = tiny_mlp()
    guard = SafeStep(capping_sgd(model.parameters()), model, logits_fn=fabric_logits_fn(fabric))
    dtypes = []  # of every forward of the last layer: the training forwards and the probe's
    model[2].register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    model, optimizer = fabric.setup(model, guard)
    x, y = rank_shard(0)
    for micro in range(4):
        with fabric.no_backward_sync(model, enabled=micro % 2 == 0):
            fabric.backward(F.cross_entropy(model(x[micro::4]), y[micro::4]) / 2)
        if micro % 2 == 1:
            optimizer.step()
            optimizer.zero_grad()
    assert unwrap_safestep(optimizer) is guard and [r.step for r in guard.history] == [0, 1]
    assert all(r.tau > 0 and not r.skipped and r.r_applied <= 1.0 + 1e-6 for r in guard.history)
    assert len(dtypes) > 4 and set(dtypes) == {torch.bfloat16}  # the probe ran under Fabric's autocast too
