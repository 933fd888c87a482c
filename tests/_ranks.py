"""Run a test's worker on 2 gloo ranks on loopback (spawned processes) and collect what each returns.

``spawn(worker, tmp_path)`` starts ``worker(rank, out_dir)`` in 2 processes with the torch.distributed environment
variables set (MASTER_ADDR/PORT, RANK, LOCAL_RANK, WORLD_SIZE), as ``torchrun`` would; with ``init=True`` the
default gloo group is initialized first, otherwise the framework under test initializes it from the environment.
A child's exception fails the test with its traceback; a hang (a collective one rank never joins) fails after
``timeout`` seconds.
"""
import datetime
import multiprocessing
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, worker, port, out_dir, init):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(worker(rank, out_dir), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(worker, tmp_path, *, init=True, timeout=90.0, start_method="spawn"):
    """worker(rank, out_dir) on 2 ranks; returns [rank 0's result, rank 1's result].

    ``start_method="fork"`` skips the children's imports (seconds per framework on a loaded machine), as OLMo-core's
    own gloo tests do, but the children inherit whatever earlier tests did to this process; "spawn" starts clean
    interpreters; "forkserver" forks them from a clean server process that imported the worker's module once."""
    if start_method == "forkserver":  # takes effect when this process's fork server starts (its first use)
        multiprocessing.set_forkserver_preload([worker.__module__])
    context = mp.start_processes(_child, args=(worker, _free_port(), str(tmp_path), init), nprocs=WORLD,
                                 join=False, start_method=start_method)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{worker.__name__} did not finish within {timeout} s (a collective mismatch hangs)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def full_flat(model):
    """All parameters gathered (FSDP2 DTensors through full_tensor, a collective) and flattened, in float64."""
    parts = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in parts]).double()


ROWS = 16  # batch rows per rank of the tiny classification problem below


def tiny_mlp():
    """The tiny 5 → 16 → 3 classifier the two-rank integration tests train (seeded)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def rank_shard(rank):
    """This rank's ROWS separable 3-class samples (a different seed per rank)."""
    generator = torch.Generator().manual_seed(100 + rank)
    y = torch.randint(0, 3, (ROWS,), generator=generator)
    return torch.eye(3, 5)[y] * 2 + torch.randn(ROWS, 5, generator=generator), y


def capping_sgd(params):
    """SGD with a learning rate large enough that the guard's cap binds."""
    return torch.optim.SGD(params, lr=4.0, momentum=0.9)


def one_process_reference(steps):
    """The tiny MLP trained ``steps`` steps in one process on every rank's rows concatenated, with the guard the rank
    tests compare against (whole-batch probe): its final parameters' model and the (τ, ρ, s) of each step."""
    from safestep import SafeStep

    model = tiny_mlp()
    reference = SafeStep(capping_sgd(model.parameters()), model, probe_size=None)
    x, y = (torch.cat(parts) for parts in zip(*(rank_shard(r) for r in range(WORLD))))
    for _ in range(steps):
        reference.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        reference.step()
    return model, [(r.tau, r.rho, r.scale) for r in reference.history]
