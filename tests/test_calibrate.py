"""calibrate: a short monitor-mode run of a target (bit-identical to plain training, hooks and group keys removed),
the probe-vs-whole-batch comparison, the recommendation rule by hand, histories, entry points and the CLI."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _small import small_data, small_mlp

from safestep.calibrate import (
    DEFAULT_PROBE,
    Calibration,
    CalibrationTarget,
    ProbeComparison,
    Rule,
    calibrate,
    calibrate_history,
    load_target,
)
from safestep.cli import main
from safestep.telemetry import History, JSONLSink, StepReport

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _target(seed=0, lr=3e-2):
    x, y = small_data(256, 4, seed=seed)
    model = small_mlp(4, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(seed)

    def train_step(opt):
        rows = torch.randint(0, 256, (64,), generator=batches)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()

    return CalibrationTarget(model, optimizer, train_step)


def test_calibrate_trains_exactly_as_plain_steps_and_leaves_no_trace():
    target, plain = _target(), _target()
    groups_before = [set(group) for group in target.optimizer.param_groups]
    result = calibrate(target, steps=8, compare=2, timing_steps=2)
    for _ in range(2 * (2 + 1) + 8):  # two timed phases of 1 + 2 steps, and the monitored steps
        plain.train_step(plain.optimizer)
    for ours, theirs in zip(target.model.parameters(), plain.model.parameters()):
        assert torch.equal(ours, theirs)  # monitor mode: every update exactly the optimizer's
    assert [set(group) for group in target.optimizer.param_groups] == groups_before
    assert not target.model._forward_pre_hooks and not target.model._forward_hooks
    assert len(result.r_probe) == 8 and result.unmeasured == 0
    assert set(result.seconds) == {"plain", "default probe", "whole batch"}
    assert result.rows_probed == 8 and result.rows_in_batch == 64


def test_comparison_measures_the_same_update_with_the_default_probe_and_the_whole_batch():
    result = calibrate(_target(), steps=9, compare=4, timing_steps=1)
    assert [c.step for c in result.comparisons] == [1, 3, 5, 7]
    for comparison in result.comparisons:  # the probed rows are a subset of the batch: their radius is no smaller
        assert comparison.rows_probed == 8 and comparison.rows_in_batch == 64
        assert comparison.rho_batch <= comparison.rho_probe * (1 + 1e-9) and comparison.overstatement >= 1 - 1e-9
    assert len(result.r_batch) == 4 + 2  # the compared steps and the whole-batch phase's 1 + 1 steps


def _calibration(r_probe, comparisons=(), seconds=None, rule=None):
    seconds = {"plain": 1.0, "default probe": 1.5, "whole batch": 3.0} if seconds is None else seconds
    return Calibration("by hand", tuple(r_probe), comparisons=tuple(comparisons), seconds=seconds, rule=rule or Rule())


def _compared(*ratios):
    return [ProbeComparison(i, ratio, 1.0, 8, 64) for i, ratio in enumerate(ratios)]


def test_rule_takes_the_smallest_r_that_caps_few_steps():
    r_probe = [0.1] * 90 + [0.7] * 7 + [1.5] * 3  # r = 0.5 caps 10 %, r = 1 caps 3 %, r = 2 none
    result = _calibration(r_probe, _compared(1.1, 1.2))
    assert result.cap_share(0.5) == pytest.approx(0.10) and result.cap_share(1.0) == pytest.approx(0.03)
    assert result.recommendation.r == 1.0 and result.recommendation.probe_size == DEFAULT_PROBE
    assert result.recommendation.code() == "SafeStep(optimizer, model, r=1)"
    assert _calibration(r_probe, _compared(1.1), rule=Rule(max_cap_share=0.1)).recommendation.r == 0.5
    hot = _calibration([3.0] * 10, _compared(1.0))
    assert hot.recommendation.r == 2.0 and "lowering it" in hot.recommendation.reasons[0]


def test_rule_probes_the_whole_batch_when_the_default_overstates_or_costs_as_much():
    overstated = _calibration([0.1] * 20, _compared(1.2, 1.6)).recommendation
    assert overstated.probe_size is None and "1.60×" in overstated.reasons[1]
    assert overstated.code() == "SafeStep(optimizer, model, r=0.5, probe_size=None)"
    cheap = _calibration([0.1] * 20, _compared(1.2), seconds={"default probe": 1.0, "whole batch": 1.05})
    assert cheap.recommendation.probe_size is None and "costs 1.05×" in cheap.recommendation.reasons[1]
    # with the whole batch chosen, r is read from r_proposed × the median overstatement (0.4 × 1.4 > 0.5)
    scaled = _calibration([0.1] * 18 + [0.4] * 2, _compared(1.4, 1.4, 1.6)).recommendation
    assert scaled.probe_size is None and scaled.r == 1.0


def test_history_calibrates_r_only_and_says_the_probe_was_not_compared(tmp_path):
    path = tmp_path / "steps.jsonl"
    history = History(sinks=[JSONLSink(path)])
    for step, r in enumerate([0.2, 0.3, 0.6, math.nan, 0.25]):
        history.append(StepReport(tau=r, rho=1.0, r_proposed=r, scale=1.0, r_applied=r, bound="ghost", method="jvp",
                                  rows_probed=2, skipped=math.isnan(r), seconds=0.01 * (step + 1), step=step,
                                  rows_in_batch=16))
    history.close()
    result = calibrate_history(path)
    assert result.r_probe == (0.2, 0.3, 0.6, 0.25) and result.unmeasured == 1
    assert result.quantiles()[1.0] == 0.6 and result.quantiles()[0.5] == pytest.approx(0.275)
    assert result.cap_share(0.5) == 0.25 and result.seconds == {"guarded step": pytest.approx(0.035)}
    recommendation = result.recommendation
    assert recommendation.r == 1.0 and not recommendation.probe_measured and "not compared" in recommendation.reasons[1]
    assert "2 of 16 rows" in result.summary()


def test_arguments_are_checked_before_any_step():
    target = _target()
    for options in ({"steps": 3, "compare": 3}, {"steps": 0}, {"timing_steps": 0}, {"radii": (1.0, -1.0)}):
        with pytest.raises(ValueError):
            calibrate(target, **options)
    assert all(p.grad is None for p in target.model.parameters())  # checked before any step
    with pytest.raises(ValueError, match="may not set r"):
        CalibrationTarget(target.model, target.optimizer, target.train_step, {"r": 2.0})
    with pytest.raises(ValueError, match="entry point must return"):
        calibrate(lambda: "not a target", steps=2, compare=0)
    with pytest.raises(ValueError, match="max_overstatement"):
        Rule(max_overstatement=0.5)
    stepping_its_own = CalibrationTarget(target.model, target.optimizer, lambda opt: target.train_step(target.optimizer))
    with pytest.raises(ValueError, match="stepped it 0 times"):
        calibrate(stepping_its_own, steps=2, compare=0, timing_steps=1)
    assert not target.model._forward_pre_hooks  # released on error too


SCRIPT = '''
import sys
sys.path.insert(0, {tests!r})
from test_calibrate import _target

def small():
    return _target()

if __name__ == "__main__":
    raise SystemExit("the training itself must not run")
'''


def test_load_target_runs_a_script_without_its_main_block(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    assert isinstance(load_target(f"{script}:small")(), CalibrationTarget)
    for spec, message in ((f"{script}", "expected"), (f"{script}:nothing", "no function nothing"),
                          (f"{tmp_path / 'absent.py'}:small", "no such script"),
                          ("no_such_module_xyz:small", "cannot import")):
        with pytest.raises(ValueError, match=message):
            load_target(spec)


def test_cli_calibrates_a_script_and_a_history(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    assert main(["calibrate", f"{script}:small", "--steps", "6", "--compare", "2", "--timing-steps", "1",
                 "--no-progress", "--no-figure"]) == 0  # the figure: test_figure_of_a_history_...
    printed = capsys.readouterr().out
    assert "recommendation: SafeStep(optimizer, model, r=" in printed and "ρ_probe / ρ_batch" in printed
    history = tmp_path / "steps.jsonl"
    History(sinks=[JSONLSink(history)]).append(StepReport(0.5, 1.0, 0.5, 1.0, 0.5, "ghost", "jvp", 2, False, 0.01))
    assert main(["calibrate", str(history), "--no-figure"]) == 0
    assert "probe: not compared" in capsys.readouterr().out
    assert main(["calibrate", str(tmp_path / "none.jsonl"), "--no-figure"]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_figure_of_a_history_draws_without_a_comparison(tmp_path):
    result = _calibration([0.1, 0.2, 0.4], seconds={"guarded step": 0.01})
    figure = result.figure()
    assert len(figure.axes) == 3 and "r=0.5" in figure.get_suptitle()
    figure.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 0
    assert main(["calibrate", str(tmp_path / "f.png"), "--out", str(tmp_path)]) == 2  # a folder is not a file name

