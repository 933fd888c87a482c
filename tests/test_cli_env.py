"""safestep in the user's environment: `python -m safestep`, the wheel's py.typed, missing extras, argument checks
that run before any work, and plotting that never touches pyplot or matplotlib's backend."""
from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import safestep.lab.demo as demo_module
from safestep.cli import main
from safestep.lab.experiments import REGISTRY

REPO = Path(__file__).resolve().parents[1]
LAB_HINT = "pip install 'safestep[lab]'"


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


def _fails_in_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI, assert exit code 2 with nothing on stdout and exactly one line on stderr; return that line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def _run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


# --- python -m safestep and the wheel -------------------------------------------------------------------------


def test_python_dash_m_runs_the_cli(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "safestep", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"safestep {version('safestep')}"


def test_the_wheel_ships_py_typed(tmp_path: Path):
    """Build a wheel from a copy of the sources (the checkout stays clean) and look for safestep/py.typed in it."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    built = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=source, capture_output=True,
                           text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = tmp_path / "dist" / built.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {"safestep/py.typed", "safestep/__main__.py", "safestep/cli.py"} <= names


# --- missing extras -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["sklearn", "matplotlib", "tqdm"])
@pytest.mark.parametrize("argv", [["demo", "--quick"], ["reproduce", "phase", "--quick"], ["reproduce", "all"]])
def test_a_missing_extra_stops_in_one_line_before_any_work(argv, missing, no_work, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # what an install without the extra looks like to import
    out = tmp_path / "out"
    line = _fails_in_one_line([*argv, "--no-progress", "--out", str(out)], capsys)
    assert LAB_HINT in line and missing in line and line.startswith(f"safestep {argv[0]}: error:")
    assert no_work == [] and not out.exists()


def test_with_every_extra_installed_the_command_gets_to_work(no_work, tmp_path):
    """The control for the test above: the same command, nothing blocked, reaches the stand-in."""
    with pytest.raises(WorkStarted):
        main(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "out")])
    assert no_work == ["demo"]


def test_no_traceback_end_to_end_through_python_dash_m(tmp_path: Path):
    """A fresh interpreter without tqdm: `python -m safestep demo` prints one line and exits 2, writing nothing."""
    out = tmp_path / "out"
    code = ("import runpy, sys; sys.modules['tqdm'] = None; "
            f"sys.argv = ['safestep', 'demo', '--out', {str(out)!r}]; runpy.run_module('safestep', run_name='__main__')")
    done = _run_python(code, tmp_path)
    assert done.returncode == 2
    assert done.stdout == "" and done.stderr.splitlines() == [
        f"safestep demo: error: this command needs the 'lab' extra (missing: tqdm); install it with: {LAB_HINT}"
    ]
    assert not out.exists()


# --- --out is checked before any work -------------------------------------------------------------------------

COMMANDS = [["demo", "--quick"], ["reproduce", "phase", "--quick"]]


@pytest.mark.parametrize("argv", COMMANDS)
def test_an_out_that_is_a_file_fails_before_any_work(argv, no_work, tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    line = _fails_in_one_line([*argv, "--no-progress", "--out", str(target)], capsys)
    assert str(target) in line and "is not a folder" in line
    assert no_work == [] and target.read_text() == "keep me"


@pytest.mark.parametrize("argv", COMMANDS)
def test_an_out_below_a_file_fails_before_any_work(argv, no_work, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    line = _fails_in_one_line([*argv, "--no-progress", "--out", str(blocker / "a" / "b")], capsys)
    assert f"{blocker} exists and is not a folder" in line
    assert no_work == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.parametrize("argv", COMMANDS)
def test_an_out_in_a_read_only_folder_fails_before_any_work(argv, no_work, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        line = _fails_in_one_line([*argv, "--no-progress", "--out", str(locked / "out")], capsys)
    finally:
        locked.chmod(0o700)
    assert f"no write permission in {locked}" in line
    assert no_work == []


def test_reproduce_all_checks_every_experiment_folder_first(no_work, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    last = list(REGISTRY)[-1]
    (out / last).write_text("")  # only the last experiment's folder is blocked: no experiment may run first
    line = _fails_in_one_line(["reproduce", "all", "--quick", "--no-progress", "--out", str(out)], capsys)
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


def test_an_unknown_experiment_fails_in_one_line_before_any_work(no_work, tmp_path, capsys):
    line = _fails_in_one_line(["reproduce", "phsae", "--out", str(tmp_path / "out")], capsys)
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


# --- plotting without pyplot ----------------------------------------------------------------------------------


@pytest.fixture
def without_pyplot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import matplotlib.pyplot` fail and `matplotlib.use` raise, as a guard against either being used."""
    import matplotlib

    def refuse(*args, **kwargs):
        raise AssertionError("library code switched matplotlib's backend")

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(matplotlib, "use", refuse)


def _lr_result():
    from safestep.lr_finder import LRFinderResult, LRRound, LRStep

    steps = tuple(LRStep(0, t, 0.1, 1.0, 0.5, 1.0 + t, 0.5 / (1.0 + t), 0.2 * (1.0 + t), False) for t in range(4))
    return LRFinderResult(suggestion=0.1, verified=True, rounds=(LRRound(0.1, steps),))


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lr_finder_plots_on_a_standalone_figure(without_pyplot, tmp_path):
    from matplotlib.figure import Figure

    for name, plot in (("r.png", _lr_result().plot), ("schedule.png", _lr_result().plot_schedule)):
        ax = plot()
        assert type(ax.figure) is Figure and ax.get_yscale() == "log"
        ax.figure.savefig(tmp_path / name)
        _assert_png(tmp_path / name)


def test_lr_finder_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'safestep\[plot\]'"):
        _lr_result().plot()


def test_write_figure_saves_a_figure_without_pyplot(without_pyplot, tmp_path):
    from matplotlib.figure import Figure

    from safestep.lab.io import write_figure

    figure = Figure()
    figure.add_subplot().plot([0, 1], [1, 0])
    _assert_png(write_figure(tmp_path / "curve.png", figure))


def test_demo_writes_its_png_without_pyplot(without_pyplot, tmp_path):
    config = demo_module.DemoConfig(steps=3, spike_start=1, spike_stop=2, eval_every=1, models=("mlp-ln",),
                                    methods=("plain", "safestep"))
    paths = demo_module.write_outputs(demo_module.run_demo(config), tmp_path)
    _assert_png(paths["demo.png"])
