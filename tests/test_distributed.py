"""SafeStep under torch.distributed: 2 gloo ranks on loopback agree with each other and with one process.

Each spawn runs several scenarios; every child saves its results to a file that the parent compares with
single-process references (plain SafeStep on the concatenated batch, or torch.func.jvp + numpy by hand).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from _ranks import WORLD, spawn

from safestep import SafeStep
from safestep.collectives import Reducer, make_reducer
from safestep.layout import probe_module
from safestep.geometry import belief_step_cap
from safestep.geometry.radius import exact_radius

SPAWN_TIMEOUT = 120.0
RHO_CONFIGS = [("ghost", "max"), ("exact", "max"), ("belief", "max"),
               ("ghost", 0.75), ("exact", 0.75), ("belief", 0.75), (("ghost", "belief"), 0.6)]
RHO_SIZES = (12, 20)  # unequal rows per rank: the quantile gather pads
TRAIN_SIZE, TRAIN_STEPS, RESUMED_STEPS = 16, 4, 2


# -- data, model, optimizers shared by parent and children --------------------------------------------------
def _shard(rank, n):
    g = torch.Generator().manual_seed(100 + rank)
    y = torch.randint(0, 3, (n,), generator=g)
    centers = torch.tensor([[2.0, 0, 0, 0, 0], [0, 2.0, 0, 0, 0], [0, 0, 2.0, 0, 0]])
    return centers[y] + torch.randn(n, 5, generator=g), y


def _concat(sizes):
    shards = [_shard(r, n) for r, n in enumerate(sizes)]
    return torch.cat([x for x, _ in shards]), torch.cat([y for _, y in shards])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))


def _train_opt(params):
    return torch.optim.SGD(params, lr=4.0, momentum=0.9)  # large: the cap binds


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _train(model, opt, x, y, steps, **step_kwargs):
    reports = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(**step_kwargs)
        reports.append(opt.last_report)
    return reports


# -- spawning --------------------------------------------------------------------------------------------------
def _gathered(t):
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return parts


# -- DDP children ----------------------------------------------------------------------------------------------
def _ddp_rho(rank):
    x, y = _shard(rank, RHO_SIZES[rank])
    out = {}
    for bound, aggregate in RHO_CONFIGS:
        model = nn.parallel.DistributedDataParallel(_mlp())
        opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.5), model, bound=list(bound) if isinstance(bound, tuple)
                       else bound, aggregate=aggregate, probe_size=None)
        F.cross_entropy(model(x), y).backward()
        opt.step(labels=y)
        out[(bound, aggregate)] = (opt.last_report.rho, opt.last_report.tau)
    return out


def _ddp_training(rank, out_dir):
    x, y = _shard(rank, TRAIN_SIZE)
    model = nn.parallel.DistributedDataParallel(_mlp())
    opt = SafeStep(_train_opt(model.parameters()), model, probe_size=None)
    reports = _train(model, opt, x, y, TRAIN_STEPS)
    out = {"scales": [r.scale for r in reports], "trained": _flat(model).clone()}
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, os.path.join(out_dir, "ckpt.pt"))
    dist.barrier()
    _train(model, opt, x, y, RESUMED_STEPS)
    out["continued"] = _flat(model).clone()
    checkpoint = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=False)
    fresh = _mlp()
    fresh.load_state_dict(checkpoint["model"])
    fresh = nn.parallel.DistributedDataParallel(fresh)
    resumed = SafeStep(_train_opt(fresh.parameters()), fresh, probe_size=None)
    resumed.load_state_dict(checkpoint["opt"])
    _train(fresh, resumed, x, y, RESUMED_STEPS)
    out["resumed"] = _flat(fresh).clone()
    out["same_across_ranks"] = all(torch.equal(p, out["continued"]) for p in _gathered(out["continued"]))
    return out


def _ddp_skips(rank):
    x, y = _shard(rank, TRAIN_SIZE)
    model = nn.parallel.DistributedDataParallel(_mlp())
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=0.1), model, probe_size=None)
    before = _flat(model).clone()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    if rank == 1:  # after DDP's all-reduce: only this rank sees it
        model.module[0].weight.grad[0, 0] = math.nan
    opt.step()
    nan_grad = (opt.last_report.skipped, opt.last_report.reason, torch.equal(_flat(model), before), len(opt.state))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    probe_x = torch.full_like(x, math.inf) if rank == 1 else x  # finite gradients, non-finite probe on rank 1
    opt.step(inputs=probe_x)
    bad_probe = (opt.last_report.skipped, opt.last_report.reason, torch.equal(_flat(model), before))
    return {"nan_grad": nan_grad, "bad_probe": bad_probe, "skipped": opt.param_groups[0]["safestep_skipped"]}


# -- misuse and FSDP children ----------------------------------------------------------------------------------
class _RowlessGhost:
    """A custom bound with a quantile aggregate but no per-row radii."""

    name = "rowless"
    aggregate = 0.5

    def __call__(self, logits, slopes, labels=None):
        return torch.tensor(1.0, dtype=torch.float64)


def _error(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as e:
        return type(e).__name__, str(e)
    return None


def _not_replicated(rank):
    x, y = _shard(rank, TRAIN_SIZE)
    model = _mlp()  # no DDP: every rank's gradient, hence update, differs
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.5), model)
    before = _flat(model).clone()
    F.cross_entropy(model(x), y).backward()
    return _error(opt.step), torch.equal(_flat(model), before)


def _fsdp2_model():
    """FSDP2 on the first layer and the root; the root owns the last layer (it stays gathered after forward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _mlp()
    for module in (model[0], model):
        fully_shard(module, mesh=mesh)
    return model


def _fsdp1_refused():
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(_mlp(), device_id=torch.device("cpu"), use_orig_params=True)
    return _error(lambda: SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model))


def _misuse_fsdp(rank):
    out = {"not_replicated": _not_replicated(rank), "fsdp1": _fsdp1_refused()}
    only_rank0 = dist.new_group([0])  # every rank must call new_group; rank 1 gets NON_GROUP_MEMBER
    plain = _mlp()
    out["outsider"] = _error(lambda: SafeStep(torch.optim.SGD(plain.parameters(), lr=0.1), plain,
                                              process_group=only_rank0))
    model = nn.parallel.DistributedDataParallel(_mlp())
    fsdp2 = _fsdp2_model()
    out["fsdp_jvp"] = _error(lambda: SafeStep(torch.optim.SGD(fsdp2.parameters(), lr=0.1), fsdp2, method="jvp"))
    x, y = _shard(rank, TRAIN_SIZE)
    opt = SafeStep(_train_opt(fsdp2.parameters()), fsdp2, probe_size=None)
    out["fsdp2"] = [(r.tau, r.rho, r.scale, r.method) for r in _train(fsdp2, opt, x, y, TRAIN_STEPS)]
    out["fsdp2_params"] = torch.cat([p.full_tensor().reshape(-1) for p in fsdp2.parameters()])
    return out


def _worker(rank, out_dir):
    return {"rho": _ddp_rho(rank), "training": _ddp_training(rank, out_dir), "skips": _ddp_skips(rank),
            **_misuse_fsdp(rank)}


# -- single-process references ---------------------------------------------------------------------------------
def _reference_radii(name):
    """Per-row radii on the concatenated batch by hand: DDP's mean gradient, SGD's Δθ, torch.func.jvp slopes."""
    model = _mlp()
    shards = [_shard(r, n) for r, n in enumerate(RHO_SIZES)]
    loss = sum(F.cross_entropy(model(x), y) for x, y in shards) / WORLD  # DDP averages the per-rank means
    grads = torch.autograd.grad(loss, list(model.parameters()))
    delta = [-0.5 * g for g in grads]
    tau = torch.sqrt(sum((d.double() ** 2).sum() for d in delta)).item()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    x, y = _concat(RHO_SIZES)
    z, a = jvp(lambda p: functional_call(model, p, (x,)), (params,), ({n: d / tau for n, d in zip(names, delta)},))
    if name == "ghost":
        return (math.pi / (a.amax(-1) - a.amin(-1)).double()).numpy(), tau
    return (exact_radius(z, a) if name == "exact" else belief_step_cap(z, a, y, rule="support")).numpy(), tau


def _quantile(radii, aggregate):
    """The ⌊(1 − q)(N − 1)⌋-th smallest radius (0-based); the smallest for "max"."""
    ordered = np.sort(radii)
    return ordered[0] if aggregate == "max" else ordered[math.floor((1 - aggregate) * (ordered.size - 1))]


def _reference_rho(bound, aggregate):
    """ρ on the concatenated batch: each member's aggregate of its per-row radii, the smallest over members."""
    names = bound if isinstance(bound, tuple) else (bound,)
    return min(_quantile(_reference_radii(name)[0], aggregate) for name in names), _reference_radii(names[0])[1]


def _reference_training(model, method="auto"):
    """A plain single-process SafeStep on the concatenated batch: per-step flat parameters."""
    x, y = _concat((TRAIN_SIZE,) * WORLD)
    opt = SafeStep(_train_opt(model.parameters()), model, probe_size=None, method=method)
    reports = _train(model, opt, x, y, TRAIN_STEPS)
    return opt, reports, x, y


# -- tests -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of 2 ranks runs every scenario: (per-rank results, the directory holding the checkpoint)."""
    tmp = tmp_path_factory.mktemp("ranks")
    return spawn(_worker, tmp, timeout=SPAWN_TIMEOUT), tmp


@pytest.mark.parametrize("bound, aggregate", RHO_CONFIGS)
def test_every_rank_gets_the_radius_of_the_concatenated_batch(spawned, bound, aggregate):
    results, _ = spawned
    rho, tau = _reference_rho(bound, aggregate)
    for rank in range(WORLD):
        got_rho, got_tau = results[rank]["rho"][(bound, aggregate)]
        assert got_tau == pytest.approx(tau, rel=1e-6)
        assert got_rho == pytest.approx(rho, rel=1e-5)
    assert results[0]["rho"][(bound, aggregate)] == results[1]["rho"][(bound, aggregate)]


def test_quantile_is_global_not_a_per_rank_quantile(spawned):
    """The gathered quantile is the global one; the naive min of per-rank quantiles differs on this data."""
    results, _ = spawned
    radii, _ = _reference_radii("ghost")
    per_rank = np.split(radii, [RHO_SIZES[0]])
    naive = min(_quantile(part, 0.75) for part in per_rank)
    got = results[0]["rho"][("ghost", 0.75)][0]
    assert got == pytest.approx(_quantile(radii, 0.75), rel=1e-5)
    assert abs(got - naive) > 1e-3 * got


def test_guarded_ddp_training_matches_one_process_on_the_concatenated_batch(spawned):
    results, _ = spawned
    reference = _mlp()
    opt, reports, x, y = _reference_training(reference)
    scales = [r.scale for r in reports]
    assert min(scales) < 0.5  # the cap binds
    for rank in range(WORLD):
        assert results[rank]["training"]["scales"] == pytest.approx(scales, rel=1e-5)
        torch.testing.assert_close(results[rank]["training"]["trained"], _flat(reference), rtol=1e-5, atol=1e-6)
    assert results[0]["training"]["same_across_ranks"] and results[1]["training"]["same_across_ranks"]
    assert torch.equal(results[0]["training"]["continued"], results[1]["training"]["continued"])


def test_ddp_checkpoint_resumes_identically_and_loads_in_one_process(spawned):
    """A DDP checkpoint (no world size stored) resumes on 2 ranks bit for bit and in a single process to ~1e-6."""
    results, tmp = spawned
    for rank in range(WORLD):
        assert torch.equal(results[rank]["training"]["resumed"], results[rank]["training"]["continued"])
    checkpoint = torch.load(tmp / "ckpt.pt", weights_only=False)
    model = _mlp()
    model.load_state_dict(checkpoint["model"])
    opt = SafeStep(_train_opt(model.parameters()), model, probe_size=None)
    opt.load_state_dict(checkpoint["opt"])
    assert opt.steps == TRAIN_STEPS
    _train(model, opt, *_concat((TRAIN_SIZE,) * WORLD), RESUMED_STEPS)
    torch.testing.assert_close(_flat(model), results[0]["training"]["continued"], rtol=1e-5, atol=1e-6)


def test_a_non_finite_gradient_or_probe_on_one_rank_skips_every_rank(spawned):
    results, _ = spawned
    for rank in range(WORLD):
        skips = results[rank]["skips"]
        assert skips["nan_grad"] == (True, "non-finite gradient: step skipped", True, 0)  # Adam state untouched
        assert skips["bad_probe"] == (True, "non-finite probe output: parameters restored", True)
        assert skips["skipped"] == 2


def test_unreplicated_parameters_are_a_clear_error_on_every_rank(spawned):
    results, _ = spawned
    for rank in range(WORLD):
        error, restored = results[rank]["not_replicated"]
        assert error[0] == "RuntimeError" and "not replicated" in error[1] and "DistributedDataParallel" in error[1]
        assert restored


def test_a_group_without_this_rank_is_refused_and_a_subgroup_of_one_is_local(spawned):
    results, _ = spawned
    assert results[0]["outsider"] is None  # rank 0 alone: world size 1, nothing to reduce
    assert results[1]["outsider"][0] == "ValueError" and "not a member of process_group" in results[1]["outsider"][1]


def test_a_bound_without_row_radii_is_refused():
    model = _mlp()
    with pytest.raises(ValueError, match=r"_RowlessGhost.*row_radii"):  # a quantile across ranks needs every row
        SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=_RowlessGhost())


def test_fsdp2_guarded_training_matches_one_process_finite_differences(spawned):
    results, _ = spawned
    reference = _mlp()
    _, reports, _, _ = _reference_training(reference, method="fd")
    expected = [(r.tau, r.rho, r.scale) for r in reports]
    assert min(r.scale for r in reports) < 0.5
    for rank in range(WORLD):
        got = results[rank]["fsdp2"]
        assert [m for *_, m in got] == ["fd"] * TRAIN_STEPS
        np.testing.assert_allclose([g[:3] for g in got], expected, rtol=1e-4)
        torch.testing.assert_close(results[rank]["fsdp2_params"], _flat(reference), rtol=1e-4, atol=1e-5)
    assert results[0]["fsdp_jvp"][0] == "ValueError" and "sharded" in results[0]["fsdp_jvp"][1]


def test_fsdp1_is_refused_with_a_pointer_to_fsdp2(spawned):
    for rank in range(WORLD):
        error = spawned[0][rank]["fsdp1"]
        assert error[0] == "ValueError" and "FSDP1" in error[1] and "fully_shard" in error[1]


# -- single-process behaviour of the distributed helpers -------------------------------------------------------
def test_process_group_must_be_a_group():
    model = _mlp()
    with pytest.raises(ValueError, match="process_group must be a torch.distributed.ProcessGroup"):
        SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, process_group="gloo")


def test_single_process_reducer_is_the_identity_and_unwraps_nothing():
    reducer = make_reducer()
    assert not reducer.active and reducer.world_size == 1
    values = torch.tensor([3.0, -1.0])
    assert torch.equal(reducer.min(values), values) and torch.equal(reducer.sum(values), values)
    assert torch.equal(reducer.max(values), values)
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(Reducer().gather_rows(rows), rows)
    model = _mlp()
    assert probe_module(model) is model and probe_module(nn.DataParallel(model)) is model
