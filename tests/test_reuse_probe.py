"""method="reuse": slopes from one forward at θ0 + h·v against the training forward's own logits z(θ0)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from safestep import SafeStep

from _small import small_data, small_mlp


def _run(method, steps=4, probe_size=None, model_seed=1, **options):
    x, y = small_data(64, 5)
    model = small_mlp(5, seed=model_seed)
    opt = SafeStep(torch.optim.AdamW(model.parameters(), lr=3e-2), model, method=method, probe_size=probe_size,
                   mode="monitor", **options)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(labels=y)
    return list(opt.history)


@pytest.mark.parametrize("probe_size", [None, 0.25])
def test_reused_logits_give_the_jvps_radius_to_first_order(probe_size):
    exact, reused = _run("jvp", probe_size=probe_size), _run("reuse", probe_size=probe_size)
    assert [r.method for r in reused] == ["reuse"] * 4 and [r.rows_probed for r in reused] == [r.rows_probed for r in exact]
    for e, u in zip(exact, reused):
        assert u.rho == pytest.approx(e.rho, rel=2e-3) and u.rho != e.rho  # a one-sided difference, not the JVP


class _Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 5))

    def forward(self, x):
        return self.net(x)


def test_a_training_forward_with_active_dropout_is_refused_before_anything_moves():
    model = _Dropped().train()
    x, y = torch.randn(32, 6), torch.randint(0, 5, (32,))
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, method="reuse")
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="method='reuse' needs the training forward to compute the same function"):
        opt.step(labels=y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and opt.steps == 0


def test_without_the_training_logits_the_jvp_runs_and_the_report_says_so():
    x, y = small_data(32, 5)
    model = small_mlp(5)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, method="reuse", capture=False)
    F.cross_entropy(model(x), y).backward()
    opt.step(inputs=x, labels=y)
    report = opt.last_report
    assert report.method == "jvp" and "no training-forward logits" in report.reason and math.isfinite(report.rho)
