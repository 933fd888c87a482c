"""Host reads per guarded step (each one stalls a GPU): counted with HostReads, which sees them on the CPU too."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safestep import SafeStep
from safestep.host_reads import HostReads


def _setup(fused=False, lr=1e-2, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 5))
    x, y = torch.randn(32, 8), torch.randint(0, 5, (32,))
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=lr, fused=fused), model, **options)
    return model, opt, x, y


def _reads_per_step(model, opt, x, y, steps=4, nan_at=None):
    counts = []
    for i in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if i == nan_at:
            next(model.parameters()).grad[0, 0] = math.nan
        with HostReads() as reads:
            opt.step()
        counts.append(reads.count("safestep"))
    return counts


def test_the_counter_attributes_reads_to_the_module_that_asked():
    t = torch.tensor([1.5, 2.0])
    with HostReads() as reads:
        t[0].item(), float(t[1]), bool(t[0] > 0), t.tolist(), int(t[1])
    assert reads.count(__name__) == 5 and reads.count("safestep") == 0


@pytest.mark.parametrize("options", [{}, {"method": "fd"}, {"mode": "set"}, {"probe_size": None}])
def test_two_reads_per_step_with_a_plain_optimizer(options):
    counts = _reads_per_step(*_setup(**options))
    assert counts[1:] == [2, 2, 2]  # gradients finite?  and the apply decision; the first step adds its preflight


def test_a_capped_step_reads_no_more():
    model, opt, x, y = _setup(lr=10.0)
    counts = _reads_per_step(model, opt, x, y)
    assert opt.last_report.capped and counts[1:] == [2, 2, 2]


def test_an_optimizer_that_skips_on_the_device_needs_one_read_and_keeps_its_state_on_nan():
    model, opt, x, y = _setup(fused=True)
    _reads_per_step(model, opt, x, y, steps=2)
    before = {k: {n: v.clone() for n, v in s.items()} for k, s in opt.optimizer.state.items()}
    theta = [p.detach().clone() for p in model.parameters()]
    counts = _reads_per_step(model, opt, x, y, steps=1, nan_at=0)
    assert counts == [1] and opt.last_report.skipped and "non-finite gradient" in opt.last_report.reason
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    for key, state in opt.optimizer.state.items():  # moments and step counts exactly as before
        assert all(torch.equal(value, before[key][name]) for name, value in state.items())
    assert _reads_per_step(model, opt, x, y, steps=2) == [1, 1] and not opt.last_report.skipped
