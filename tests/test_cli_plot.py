"""`safestep plot HISTORY`: a SafeStep history (CSV or JSON lines) drawn to a PNG, and its one-line errors."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from test_cli_env import _assert_png

from safestep.cli import _history_figure, main
from safestep.telemetry import History, JSONLSink, StepReport, read_reports


def _report(step: int, tau: float, rho: float, r: float = 1.0, skipped: bool = False) -> StepReport:
    """A cap-mode report: s = min(1, r·ρ/τ), or a skipped step (nothing applied)."""
    scale = 0.0 if skipped else min(1.0, r * rho / tau)
    return StepReport(tau=tau, rho=rho, r_proposed=tau / rho, scale=scale, r_applied=0.0 if skipped else scale * tau / rho,
                      bound="ghost", method="jvp", rows_probed=16, skipped=skipped, seconds=0.01, step=step)


REPORTS = [_report(0, 0.1, 0.5), _report(1, 40.0, 0.5), _report(2, 0.2, math.inf), _report(3, math.nan, math.nan, skipped=True),
           _report(4, 0.3, 0.4)]


@pytest.fixture
def history(tmp_path: Path) -> History:
    history = History(sinks=[JSONLSink(tmp_path / "streamed.jsonl")])
    for report in REPORTS:
        history.append(report)
    history.close()
    return history


@pytest.mark.parametrize("name", ["streamed.jsonl", "dumped.csv", "dumped.jsonl"])
def test_plot_writes_a_png_from_every_history_format(name, history, without_pyplot, tmp_path, capsys):
    path = tmp_path / name
    if name.startswith("dumped"):
        history.to_csv(path) if name.endswith(".csv") else history.to_jsonl(path)
    out = tmp_path / "figures" / "steps.png"
    assert main(["plot", str(path), "--out", str(out)]) == 0
    _assert_png(out)
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_plot_defaults_to_the_history_name_with_png(history, tmp_path):
    assert main(["plot", str(tmp_path / "streamed.jsonl")]) == 0
    _assert_png(tmp_path / "streamed.png")


def test_the_figure_draws_each_field_per_step_with_gaps_where_a_log_axis_cannot(history, tmp_path):
    figure = _history_figure(read_reports(tmp_path / "streamed.jsonl"), "run")
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for ax in figure.axes for line in ax.lines}
    nan = math.nan
    expected = {
        "τ = ‖Δθ‖ (proposed)": [0.1, 40.0, 0.2, nan, 0.3],
        "ρ (radius)": [0.5, 0.5, nan, nan, 0.4],  # ρ = inf (every row ignored) leaves a gap
        "r proposed = τ/ρ": [0.2, 80.0, nan, nan, 0.75],  # r = 0 cannot sit on a log axis
        "r applied = s·τ/ρ": [0.2, 1.0, nan, nan, 0.75],
        "s": [1.0, 0.0125, 1.0, nan, 1.0],
    }
    for label, values in expected.items():
        steps, ys = drawn[label]
        assert steps == [0, 1, 2, 3, 4]
        assert ys == pytest.approx(values, nan_ok=True), label
    assert drawn["skipped"][0] == [3]
    assert [ax.get_yscale() for ax in figure.axes] == ["log"] * 3
    assert figure.get_suptitle() == "run: 5 steps, 1 capped, 1 skipped"


def test_a_missing_or_invalid_history_fails_in_one_line(tmp_path, fails_in_one_line):
    (tmp_path / "notes.csv").write_text("name,value\nlr,0.1\n")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "h.csv").write_text("")
    cases = {
        "missing.jsonl": "cannot read {}: No such file or directory",
        "notes.csv": "{}: not a CSV or JSON-lines file of step reports (the header lacks tau",
        "empty.jsonl": "{} holds no step reports",
    }
    for name, message in cases.items():
        path = tmp_path / name
        line = fails_in_one_line(["plot", str(path)])
        assert line.startswith("safestep plot: error: " + message.format(path)), line
    line = fails_in_one_line(["plot", str(tmp_path / "h.csv"), "--out", str(tmp_path / "folder.png")])
    assert "cannot write the figure to" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "folder.png", "h.csv", "notes.csv"]


def test_plot_without_matplotlib_names_the_plot_extra(history, monkeypatch, tmp_path, fails_in_one_line):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = fails_in_one_line(["plot", str(tmp_path / "streamed.jsonl")])
    assert line == ("safestep plot: error: this command needs the 'plot' extra (missing: matplotlib); "
                    "install it with: pip install 'safestep[plot]'")
    assert not (tmp_path / "streamed.png").exists()


def test_a_history_of_skipped_steps_still_plots(tmp_path):
    """Nothing positive to draw: the panels fall back to linear axes instead of failing to place log ticks."""
    history = History()
    history.append(_report(0, math.nan, math.nan, skipped=True))
    path = history.to_csv(tmp_path / "skipped.csv")
    assert main(["plot", str(path)]) == 0
    _assert_png(tmp_path / "skipped.png")
