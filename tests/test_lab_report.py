"""The lab's output contract: atomic writes, JSON conversion, report files and the list/reproduce CLI."""
from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from safestep.cli import main
from safestep.lab import experiments
from safestep.lab.experiments import Experiment, RunOptions
from safestep.lab.io import json_ready, write_atomically, write_json
from safestep.lab.report import (
    Claim, ExperimentResult, load_results, replace_block, reproduction_table, write_combined_report, write_result,
)


def test_json_ready_converts_tensors_arrays_and_non_finite_floats():
    payload = {"a": torch.tensor(1.5), "b": [math.inf, -math.inf, math.nan], 3: torch.arange(3)}
    assert json_ready(payload) == {"a": 1.5, "b": ["inf", "-inf", "nan"], "3": [0, 1, 2]}


def test_write_atomically_leaves_no_file_when_the_writer_fails(tmp_path: Path):
    target = tmp_path / "out.json"
    write_json(target, {"x": 1})

    def broken(handle):
        handle.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, broken)
    assert json.loads(target.read_text()) == {"x": 1}  # the old content survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp file left behind


def test_claim_rejects_unknown_verdict():
    with pytest.raises(ValueError, match="verdict"):
        Claim("c", "1", "2", "roughly")


def _figure():
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def _result(name: str = "toy") -> ExperimentResult:
    return ExperimentResult(
        name=name, title="Toy claim", paper_ref="Fig. 0", protocol="two numbers", config={"steps": 3},
        seeds=[0], metrics={"value": 0.5, "curve": [1.0, math.nan]},
        claims=[Claim("value is one half", "0.5", "0.5", "holds"), Claim("pipe | in text", "1", "2", "differs")],
        figures={"curve": _figure}, notes=["a note"], seconds=0.25,
    )


def test_write_result_writes_json_png_and_markdown(tmp_path: Path):
    paths = write_result(_result(), tmp_path)
    assert set(paths) == {"curve.png", "results.json", "report.md"}
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["metrics"]["curve"] == [1.0, "nan"]
    assert data["environment"]["torch"] == torch.__version__
    assert data["claims"][1]["verdict"] == "differs"
    report = (tmp_path / "report.md").read_text()
    assert "| value is one half | 0.5 | 0.5 | **holds** |" in report
    assert "pipe \\| in text" in report  # table cells are escaped
    assert "![curve.png](curve.png)" in report


def test_reproduction_table_lists_every_claim_unflattering_first(tmp_path: Path):
    write_result(_result("alpha"), tmp_path / "alpha")
    write_result(_result("beta"), tmp_path / "beta", quick=True)
    payloads = load_results(tmp_path)
    assert [p["name"] for p in payloads] == ["alpha", "beta"]
    assert payloads[0]["command"] == "safestep reproduce alpha" and payloads[1]["command"].endswith("--quick")
    lines = reproduction_table(payloads).splitlines()
    assert lines[0] == "| experiment | claim | paper | ours | verdict | seeds | command |"
    rows = [line for line in lines[2:] if line.startswith("| [")]
    assert len(rows) == 4  # every claim of every result
    assert [("differs" in row, "alpha" in row.split("|")[1]) for row in rows] == [
        (True, True), (True, False), (False, True), (False, False)]
    assert "pipe \\| in text" in rows[0] and "`safestep reproduce alpha`" in rows[0] and "| 1 (0) |" in rows[0]
    assert lines[-1] == "Verdicts: differs 2, holds 2. Quick (CI-sized) results, not the paper's protocol: beta."
    gap = reproduction_table(payloads, missing=["gamma"]).splitlines()[2]
    assert gap.startswith("| gamma |") and "**not run**" in gap and "`safestep reproduce gamma`" in gap


def test_replace_block_swaps_only_the_marked_lines():
    text = ("intro\n<!-- reproduction-table:start (generated) -->\nold 1\nold 2\n"
            "<!-- reproduction-table:end -->\noutro\n")
    assert replace_block(text, "| new |\n") == ("intro\n<!-- reproduction-table:start (generated) -->\n| new |\n"
                                               "<!-- reproduction-table:end -->\noutro\n")
    with pytest.raises(ValueError, match="block"):
        replace_block("no markers here", "| new |")


def test_combined_report_counts_verdicts(tmp_path: Path):
    path = write_combined_report([_result("a"), _result("b")], tmp_path)
    text = path.read_text()
    assert "[a](a/report.md)" in text and "[b](b/report.md)" in text
    assert "Verdicts: holds 2, differs 2" in text


@pytest.fixture
def toy_registry(monkeypatch: pytest.MonkeyPatch):
    calls: list[RunOptions] = []
    registry = {}
    for name in ("toy", "toy2"):
        module = types.ModuleType(f"safestep_{name}_experiment")

        def run(options: RunOptions, name: str = name) -> ExperimentResult:
            calls.append(options)
            options.report(1, 2, "half")
            options.report(2, 2, "done")
            return _result(name)

        module.EXPERIMENT = Experiment(name, "Fig. 0", "a toy", "1 s", "0.1 s", run)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        registry[name] = module.__name__
    monkeypatch.setattr(experiments, "REGISTRY", registry)
    return calls


def test_list_and_reproduce_run_through_the_registry(tmp_path: Path, toy_registry, capsys):
    assert main(["list"]) == 0
    assert "Fig. 0" in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["reproduce", "toy", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    assert toy_registry[-1].quick and toy_registry[-1].seeds == 2
    assert "Quick (CI-sized) run" in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text())["quick"] is True
    printed = capsys.readouterr().out
    assert "[holds] value is one half" in printed


def test_reproduce_all_writes_one_folder_per_experiment_and_a_combined_report(tmp_path: Path, toy_registry):
    assert main(["reproduce", "all", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "toy" / "report.md").exists() and (tmp_path / "toy2" / "results.json").exists()
    combined = (tmp_path / "report.md").read_text()
    assert "Verdicts:" in combined and "Quick (CI-sized) run" not in combined


def test_reproduce_unknown_name_exits_2(tmp_path: Path, toy_registry, capsys):
    assert main(["reproduce", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_run_options_seeds():
    assert RunOptions().seed_tuple((7, 11)) == (7, 11)
    assert RunOptions(seeds=3).seed_tuple((7, 11)) == (0, 1, 2)
    assert RunOptions().seed_tuple(3) == (0, 1, 2) and RunOptions(seeds=1).seed_tuple(3) == (0,)
    with pytest.raises(ValueError, match="seeds must be >= 1"):
        RunOptions(seeds=0)


def test_report_command_prints_or_rewrites_the_readme_block(tmp_path: Path, capsys):
    write_result(_result("alpha"), tmp_path / "results" / "alpha")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- reproduction-table:start (generated) -->\nstale\n<!-- reproduction-table:end -->\n")
    assert main(["report", "--results", str(tmp_path / "results")]) == 0
    printed = capsys.readouterr().out
    assert "| [alpha](" in printed and "**differs**" in printed and "**not run**" in printed  # registry gaps listed
    assert main(["report", "--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 1
    assert main(["report", "--results", str(tmp_path / "results"), "--readme", str(readme)]) == 0
    assert "stale" not in readme.read_text() and "| [alpha](" in readme.read_text()
    assert main(["report", "--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 0
    assert main(["report", "--results", str(tmp_path / "empty")]) == 2
