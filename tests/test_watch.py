"""A frozen warning that means frozen: a collapsed radius warns, capped long proposals (an LR spike) do not."""
import warnings

import torch
import torch.nn.functional as F

from safestep import SafeStep, StepReport
from safestep.watch import FREEZE_SCALE, FREEZE_STEPS, FreezeWatch

from _small import small_data, small_mlp


def _report(rho, tau, r=1.0, step=0):
    scale = min(1.0, r * rho / tau)
    return StepReport(tau=tau, rho=rho, r_proposed=tau / rho, scale=scale, r_applied=scale * tau / rho, bound="ghost",
                      method="jvp", rows_probed=8, skipped=False, seconds=0.0, step=step)


def _feed(watch, reports):
    return [watch.record(report) for report in reports]


def test_a_collapsed_radius_warns_once_with_its_numbers():
    watch = FreezeWatch()
    calm = _feed(watch, [_report(1.0, 0.5) for _ in range(60)])
    collapsed = _feed(watch, [_report(1e-3, 0.5) for _ in range(FREEZE_STEPS + 10)])
    assert not any(v.warning for v in calm)
    warned = [v for v in collapsed if v.warning]
    assert len(warned) == 1 and "radius collapsed" in warned[0].warning and "1 before, 0.001 now" in warned[0].warning
    assert collapsed.index(warned[0]) == FREEZE_STEPS - 1 and "frozen" in collapsed[-1].note


def test_long_proposals_capped_at_a_steady_radius_are_reported_not_warned():
    watch = FreezeWatch()
    _feed(watch, [_report(1.0, 0.5) for _ in range(60)])
    spike = _feed(watch, [_report(1.0, 5e3) for _ in range(FREEZE_STEPS + 10)])
    assert not any(v.warning for v in spike)
    assert "capping long proposals" in spike[-1].note and "grew 1e+04x" in spike[-1].note


def test_a_streak_shorter_than_the_window_says_nothing():
    watch = FreezeWatch()
    verdicts = _feed(watch, [_report(1e-3, 0.5) for _ in range(FREEZE_STEPS - 1)] + [_report(1.0, 0.5)])
    assert not any(v.note or v.warning for v in verdicts) and watch.streak == 0


def test_an_lr_spike_capped_by_safestep_raises_no_frozen_warning():
    model = small_mlp(5)
    x, y = small_data(64, 5)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = SafeStep(inner, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a frozen warning would fail the test
        for step in range(130):
            inner.param_groups[0]["lr"] = 0.05 * (1e6 if 60 <= step < 130 else 1.0)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(labels=y)
    spiked = list(opt.history)[60:]
    assert all(r.scale < FREEZE_SCALE for r in spiked)
    assert "capping long proposals" in spiked[-1].reason
