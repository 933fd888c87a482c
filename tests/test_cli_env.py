"""safestep in the user's environment: `python -m safestep`, the wheel (py.typed, no lab inside), the library
without the lab (it never imports it, and the lab's commands stop in one line) and plotting that never touches
pyplot or matplotlib's backend. The lab's own commands are tested in lab/tests/test_lab_cli.py."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB_COMMANDS = ("demo", "list", "reproduce", "report")


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- python -m safestep and the wheel -------------------------------------------------------------------------


def test_python_dash_m_runs_the_cli(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "safestep", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"safestep {version('safestep')}"


def test_the_wheel_ships_py_typed_and_only_the_library(tmp_path: Path):
    """Build a wheel from a copy of the sources (the checkout stays clean): py.typed is in it, no lab module is."""
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
    assert [name for name in names if name.startswith(("safestep/lab/", "safestep_lab/"))] == []


# --- the library without the lab ------------------------------------------------------------------------------

_HIDE_LAB = """
import importlib, importlib.metadata, pkgutil, sys

class HideLab:  # an environment without safestep-lab, as import and the entry points see it
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "safestep_lab":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, HideLab())
every_entry_point = importlib.metadata.entry_points
importlib.metadata.entry_points = lambda **kw: [] if kw.get("group") == "safestep.cli" else every_entry_point(**kw)
import safestep
for info in pkgutil.walk_packages(safestep.__path__, "safestep."):
    try:
        importlib.import_module(info.name)
    except ImportError as error:  # an integration whose framework is not installed, never the lab
        assert "safestep_lab" not in str(error), error
from safestep.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run_without_lab(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Import every safestep module with the lab hidden, then run `safestep ARGV` and exit with its code."""
    return subprocess.run([sys.executable, "-c", _HIDE_LAB, *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


LAB_MISSING = ("error: this command is part of the reproduction lab, which is not installed; install it with: "
               "pip install -e lab (in a clone of the repository, or run: make demo)")


def test_without_the_lab_every_library_module_imports_and_a_lab_command_stops_in_one_line(tmp_path: Path):
    out = tmp_path / "out"
    done = _run_without_lab(["reproduce", "spike", "--quick", "--out", str(out)], tmp_path)
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    # the last line: importing every integration may let a framework log to stderr first
    assert done.stderr.splitlines()[-1] == f"safestep reproduce: {LAB_MISSING}" and not out.exists()


@pytest.mark.parametrize("argv", [[name] for name in LAB_COMMANDS] + [["demo", "--quick", "-h"], ["report", "x"]])
def test_without_the_lab_its_commands_stop_in_one_line_whatever_their_arguments(argv, monkeypatch, fails_in_one_line):
    import safestep.cli

    monkeypatch.setattr(safestep.cli, "entry_points", lambda group: [])
    assert fails_in_one_line(argv) == f"safestep {argv[0]}: {LAB_MISSING}"


def test_a_lab_that_fails_to_load_leaves_the_library_commands_working(monkeypatch, fails_in_one_line, tmp_path):
    """A broken entry point (the lab's package gone, its metadata left) used to take `safestep plot` down with it."""
    import safestep.cli

    class Broken:
        value = "safestep_lab.cli:register"

        def load(self):
            raise ModuleNotFoundError("No module named 'safestep_lab'")

    monkeypatch.setattr(safestep.cli, "entry_points", lambda group: [Broken()])
    assert {"plot", "calibrate"} <= set(safestep.cli.build_parser()._subparsers._group_actions[0].choices)
    line = fails_in_one_line(["demo", "--quick"])
    assert line == ("safestep demo: error: the lab is installed but failed to load: safestep_lab.cli:register: "
                    "ModuleNotFoundError: No module named 'safestep_lab'")
    assert fails_in_one_line(["plot", str(tmp_path / "missing.jsonl")]).startswith("safestep plot: error: cannot read")


def test_the_core_tests_never_import_the_lab():
    """The library's tests run without the lab installed: none of them names safestep_lab (this file only hides it)."""
    this = Path(__file__).name
    naming = [p.name for p in (REPO / "tests").glob("*.py") if p.name != this and "safestep_lab" in p.read_text()]
    assert naming == []


# --- plotting without pyplot ----------------------------------------------------------------------------------


def _lr_result():
    from safestep.lr_finder import LRFinderResult, LRRound, LRStep

    steps = tuple(LRStep(0, t, 0.1, 1.0, 0.5, 1.0 + t, 0.5 / (1.0 + t), 0.2 * (1.0 + t), False) for t in range(4))
    return LRFinderResult(suggestion=0.1, verified=True, rounds=(LRRound(0.1, steps),))


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
