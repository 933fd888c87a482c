"""Test set-up shared by the library's tests (tests/) and the lab's (lab/tests/): every test runs with one torch
thread; ``--radius-mutant`` runs the suite on a wrong radius; fixtures for the command line's one-line errors and for
plotting without pyplot. Nothing here imports the lab unless a mutant is asked for.

The suite's models are tiny; with several threads on a busy 2-core machine their small ops slow down 5–10×.

Mutation testing (``lab/tools/radius_mutants.py`` drives it): ``--radius-mutant=3`` (or the environment variable
``SAFESTEP_RADIUS_MUTANT=3``) multiplies every radius the geometry layer hands out — ρ_a = π/Δ_a, the binary and
exact radii and the belief-space step bounds η_max, η_ADS — by the factor, as seen by every other module of
safestep and, when it is installed, of the lab (safestep_lab);
the slope spreads Δ_a (from which callers form π/Δ_a themselves) are divided by it. The geometry files are not
touched: the bindings other modules imported are swapped at run time, and the geometry modules' own internals keep
the true functions (their solvers stay correct; only what they return is scaled).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

MUTANT_ENV = "SAFESTEP_RADIUS_MUTANT"
# the geometry layer's radius functions, and the power of the factor that scales what each returns
_RADIUS_FUNCTIONS = {
    "safestep.geometry.radius": {"radius_lower_bound": 1, "binary_radius": 1, "exact_radius": 1,
                                 "min_exact_radius": 1, "spread": -1, "row_spread": -1},
    "safestep.geometry.weighted": {"weighted_radius": 1, "min_weighted_radius": 1},
    "safestep.geometry.simplex": {"max_step": 1, "ads_step": 1},
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--radius-mutant", type=float, default=None,
                     help=f"scale every geometry-layer radius by this factor (mutation testing; env {MUTANT_ENV})")


def _scaled(function: Callable[..., Any], factor: float) -> Callable[..., Any]:
    def mutant(*args: Any, **kwargs: Any) -> Any:
        value = function(*args, **kwargs)
        if isinstance(value, tuple):  # min_exact_radius: (radius, row)
            return (value[0] * factor, *value[1:])
        return value * factor

    mutant.__name__ = mutant.__qualname__ = function.__name__
    mutant.__doc__ = function.__doc__
    return mutant


def _import_all_safestep_modules() -> None:
    """Import every module of safestep and, if installed, of the lab, so that their bindings can be swapped."""
    packages = [name for name in ("safestep", "safestep_lab") if importlib.util.find_spec(name) is not None]
    for package in map(importlib.import_module, packages):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            try:
                importlib.import_module(info.name)
            except ImportError:  # optional integrations whose framework is not installed
                continue


def install_radius_mutant(factor: float) -> int:
    """Swap every other module's binding of a geometry radius function for ×factor; returns the bindings swapped."""
    _import_all_safestep_modules()
    mutants = {}
    for module, powers in _RADIUS_FUNCTIONS.items():
        for name, power in powers.items():
            function = getattr(sys.modules[module], name, None)  # absent in older geometry layers
            if function is not None:
                mutants[function] = _scaled(function, factor**power)
    swapped = 0
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("safestep") or module_name in _RADIUS_FUNCTIONS:
            continue
        for attribute, value in list(vars(module).items()):
            if callable(value) and value in mutants:
                setattr(module, attribute, mutants[value])
                swapped += 1
    return swapped


def pytest_configure(config: pytest.Config) -> None:
    option = config.getoption("--radius-mutant")
    factor = option if option is not None else (float(os.environ[MUTANT_ENV]) if os.environ.get(MUTANT_ENV) else None)
    if factor is not None and factor != 1.0:
        config.radius_mutant = (factor, install_radius_mutant(factor))


def pytest_report_header(config: pytest.Config) -> str | None:
    mutant = getattr(config, "radius_mutant", None)
    return None if mutant is None else f"radius mutant: every geometry radius ×{mutant[0]:g} ({mutant[1]} bindings)"


@pytest.fixture(autouse=True, scope="session")
def single_torch_thread() -> Iterator[None]:
    """torch.set_num_threads(1) for the whole session, restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fails_in_one_line(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], str]:
    """A function running the CLI on argv that asserts exit code 2, nothing on stdout and exactly one line on
    stderr, and returns that line."""
    from safestep.cli import main

    def run(argv: list[str]) -> str:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        lines = captured.err.splitlines()
        assert len(lines) == 1, captured.err
        return lines[0]

    return run


@pytest.fixture
def without_pyplot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import matplotlib.pyplot` fail and `matplotlib.use` raise, as a guard against either being used."""
    import matplotlib

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("library code switched matplotlib's backend")

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    monkeypatch.setattr(matplotlib, "use", refuse)
