"""The lab's commands in the user's environment: missing dependencies, argument checks and --out checks that run
before any work, and the lab's figures drawn without pyplot. (The library without the lab: tests/test_cli_env.py.)"""
from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import safestep_lab.demo as demo_module
from safestep.cli import main
from safestep_lab.experiments import REGISTRY

LAB_HINT = "pip install -e lab"
PNG = b"\x89PNG\r\n\x1a\n"


class WorkStarted(Exception):
    """Raised by the stand-ins for the demo and the experiments: the command got past its checks."""


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace run_demo and every experiment's run by stand-ins that log their name and raise WorkStarted."""
    started: list[str] = []

    def stand_in(name: str):
        def run(*args, **kwargs):
            started.append(name)
            raise WorkStarted(name)

        return run

    monkeypatch.setattr(demo_module, "run_demo", stand_in("demo"))
    for name, module_name in REGISTRY.items():
        module = importlib.import_module(module_name)
        monkeypatch.setattr(module, "EXPERIMENT", dataclasses.replace(module.EXPERIMENT, run=stand_in(name)))
    return started


# --- missing dependencies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["sklearn", "matplotlib", "tqdm"])
@pytest.mark.parametrize("argv", [["demo", "--quick"], ["reproduce", "phase", "--quick"], ["reproduce", "all"]])
def test_a_missing_dependency_stops_in_one_line_before_any_work(argv, missing, no_work, monkeypatch, tmp_path,
                                                                 fails_in_one_line):
    monkeypatch.setitem(sys.modules, missing, None)  # what an install without the dependency looks like to import
    out = tmp_path / "out"
    line = fails_in_one_line([*argv, "--no-progress", "--out", str(out)])
    assert LAB_HINT in line and missing in line and line.startswith(f"safestep {argv[0]}: error:")
    assert no_work == [] and not out.exists()


def test_with_every_dependency_installed_the_command_gets_to_work(no_work, tmp_path):
    """The control for the test above: the same command, nothing blocked, reaches the stand-in."""
    with pytest.raises(WorkStarted):
        main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "out")])
    assert no_work == ["demo"]


def test_no_traceback_end_to_end_through_python_dash_m(tmp_path: Path):
    """A fresh interpreter without tqdm: `python -m safestep demo` prints one line and exits 2, writing nothing."""
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.modules['tqdm'] = None; "
            f"sys.argv = ['safestep', 'demo', '--out', {str(out)!r}]; runpy.run_module('safestep', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.splitlines() == [
        f"safestep demo: error: this command needs the lab's dependencies (missing: tqdm); install them with: {LAB_HINT}"
    ]
    assert not out.exists()


# --- --out is checked before any work -------------------------------------------------------------------------

COMMANDS = [["demo", "--quick"], ["reproduce", "phase", "--quick"]]


@pytest.mark.parametrize("argv", COMMANDS)
def test_an_out_that_is_a_file_fails_before_any_work(argv, no_work, tmp_path, fails_in_one_line):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    line = fails_in_one_line([*argv, "--no-progress", "--out", str(target)])
    assert str(target) in line and "is not a folder" in line
    assert no_work == [] and target.read_text() == "keep me"


@pytest.mark.parametrize("argv", COMMANDS)
def test_an_out_below_a_file_fails_before_any_work(argv, no_work, tmp_path, fails_in_one_line):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = fails_in_one_line([*argv, "--no-progress", "--out", str(blocker / "a" / "b")])
    assert f"{blocker} exists and is not a folder" in line
    assert no_work == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.parametrize("argv", COMMANDS)
def test_an_out_in_a_read_only_folder_fails_before_any_work(argv, no_work, tmp_path, fails_in_one_line):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = fails_in_one_line([*argv, "--no-progress", "--out", str(locked / "out")])
    finally:
        locked.chmod(0o700)
    assert f"no write permission in {locked}" in line
    assert no_work == []


def test_reproduce_all_checks_every_experiment_folder_first(no_work, tmp_path, fails_in_one_line):
    out = tmp_path / "out"
    out.mkdir()
    last = list(REGISTRY)[-1]
    (out / last).write_text("")  # only the last experiment's folder is blocked: no experiment may run first
    line = fails_in_one_line(["reproduce", "all", "--quick", "--no-progress", "--out", str(out)])
    assert f"{out / last} exists and is not a folder" in line
    assert no_work == []


@pytest.mark.parametrize("argv", COMMANDS)
def test_a_new_nested_out_folder_is_accepted_and_not_created_by_the_check(argv, no_work, tmp_path):
    out = tmp_path / "new" / "nested"
    with pytest.raises(WorkStarted):
        main([*argv, "--no-progress", "--out", str(out)])
    assert no_work == [argv[0] if argv[0] == "demo" else argv[1]]
    assert not (tmp_path / "new").exists()


# --- every other argument -------------------------------------------------------------------------------------


def test_an_unknown_experiment_fails_in_one_line_before_any_work(no_work, tmp_path, fails_in_one_line):
    line = fails_in_one_line(["reproduce", "phsae", "--out", str(tmp_path / "out")])
    assert "unknown experiment 'phsae'" in line and "phase" in line
    assert no_work == [] and not (tmp_path / "out").exists()


BAD_NUMBERS = [
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "ten"], "--steps"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--threads", str((os.cpu_count() or 1) + 1)], "--threads"),
    (["demo", "--seed", "-1"], "--seed"),
    (["demo", "--seed", str(2**64)], "--seed"),
    (["demo", "--quick", "--steps", "100"], "--steps"),  # --quick would silently ignore --steps
    (["reproduce", "phase", "--seeds", "0"], "--seeds"),
    (["reproduce", "phase", "--seeds", "-2"], "--seeds"),
    (["reproduce", "phase", "--threads", "0"], "--threads"),
]


@pytest.mark.parametrize(("argv", "option"), BAD_NUMBERS)
def test_bad_numbers_exit_two_naming_the_option_before_any_work(argv, option, no_work, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--no-progress", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"error: argument {option}" in capsys.readouterr().err
    assert no_work == []


GOOD_NUMBERS = [
    ["demo", "--steps", "1"],
    ["demo", "--threads", str(os.cpu_count() or 1)],
    ["demo", "--seed", str(2**64 - 1)],
    ["reproduce", "phase", "--seeds", "1", "--threads", "1"],
]


@pytest.mark.parametrize("argv", GOOD_NUMBERS)
def test_numbers_at_the_limits_are_accepted(argv, no_work, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)  # the session keeps its own thread count
    with pytest.raises(WorkStarted):
        main([*argv, "--no-progress", "--out", str(tmp_path / "out")])
    assert len(no_work) == 1


def test_write_figure_saves_a_figure_without_pyplot(without_pyplot, tmp_path):
    from matplotlib.figure import Figure

    from safestep_lab.io import write_figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    assert write_figure(tmp_path / "curve.png", figure).read_bytes()[:8] == PNG


def test_demo_writes_its_png_without_pyplot(without_pyplot, tmp_path):
    config = demo_module.DemoConfig(steps=3, spike_start=1, spike_stop=2, eval_every=1, models=("mlp-ln",),
                                    methods=("plain", "safestep"))
    paths = demo_module.write_outputs(demo_module.run_demo(config), tmp_path)
    assert paths["demo.png"].read_bytes()[:8] == PNG
