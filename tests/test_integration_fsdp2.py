"""The torchtitan-style FSDP2 recipe: ``fully_shard`` per block and on the root, SafeStep built on the shards,
torch.distributed.checkpoint (DCP) before the first step and after the last, and a resume from the checkpoint that
continues bit for bit; 2 gloo ranks on CPU, a tiny causal transformer."""
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from _ranks import WORLD, full_flat, spawn
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from safestep import SafeStep

VOCAB, DIM, SEQ, ROWS, STEPS = 32, 16, 8, 4, 3


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.qkv, self.out = nn.LayerNorm(DIM), nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, h):
        q, k, v = self.qkv(self.norm(h)).unflatten(-1, (3, 2, DIM // 2)).permute(2, 0, 3, 1, 4)
        h = h + self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        return h + self.mlp(h)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.layers, self.head = nn.Embedding(VOCAB, DIM), nn.ModuleList([Block(), Block()]), nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _sharded():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model, mesh = TinyLM(), init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, SafeStep(torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.1), model)


def _batch(rank, step):
    ids = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(10 * step + rank))
    return ids[:, :-1], ids[:, 1:]


def _train(model, guard, rank, steps, applied=None):
    for step in steps:
        x, y = _batch(rank, step)
        before = full_flat(model)
        guard.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        guard.step()
        if applied is not None:
            applied.append((full_flat(model) - before).norm().item())


def _state(model, guard):
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, guard.optimizer)}


def _torchtitan_style(rank, out_dir):
    model, guard = _sharded()
    initial = full_flat(model)
    dcp.save(_state(model, guard), checkpoint_id=f"{out_dir}/step0")  # DCP initializes the empty AdamW state
    moved_by_init = (full_flat(model) - initial).norm().item()
    applied = []
    _train(model, guard, rank, range(STEPS), applied)
    dcp.save(_state(model, guard), checkpoint_id=f"{out_dir}/step{STEPS}")
    _train(model, guard, rank, [STEPS])
    continued = full_flat(model)

    fresh, resumed = _sharded()
    state = _state(fresh, resumed)
    dcp.load(state, checkpoint_id=f"{out_dir}/step{STEPS}")
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, resumed.optimizer, state["optim"])
    _train(fresh, resumed, rank, [STEPS])
    dist.barrier()
    return {"moved_by_init": moved_by_init, "reports": [(r.tau, r.rho, r.scale, r.method) for r in guard.history],
            "applied": applied, "continued": continued, "resumed": full_flat(fresh),
            "counters": (resumed.steps, [r.step for r in resumed.history]), "sharded": type(next(model.parameters())).__name__}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_torchtitan_style, tmp_path_factory.mktemp("fsdp2"), start_method="fork")


def test_fsdp2_by_hand_every_rank_applies_the_same_capped_scale_within_the_radius(ranks):
    reports = ranks[0]["reports"]
    assert len(reports) == STEPS + 1 and all(method == "fd" and scale < 1.0 for _, _, scale, method in reports)
    for result in ranks:
        assert result["sharded"] == "DTensor" and result["reports"] == reports  # bit for bit on every rank
        for (tau, rho, scale, _), moved in zip(reports, result["applied"]):
            assert moved == pytest.approx(scale * tau, rel=1e-4) and moved <= rho * (1 + 1e-4)
    assert torch.equal(ranks[0]["continued"], ranks[1]["continued"])


def test_dcp_checkpoints_the_inner_optimizer_and_resumes_bit_for_bit(ranks):
    for result in ranks:
        assert result["moved_by_init"] == 0.0  # DCP's state initialization (lr 0, zero gradients) moved nothing
        assert result["counters"] == (STEPS + 1, [STEPS])  # the guard's counters came back with the state
        assert torch.equal(result["resumed"], result["continued"])
