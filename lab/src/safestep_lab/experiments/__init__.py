"""The experiments of `safestep reproduce`: one module per paper claim, each exposing ``EXPERIMENT``.

``REGISTRY`` maps a name to its module path; ``load(name)`` imports it on demand so `safestep list` stays fast.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from ..parallel import default_workers
from ..report import ExperimentResult

__all__ = ["Progress", "RunOptions", "Experiment", "REGISTRY", "load"]

Progress = Callable[[int, int, str], None]
"""progress(done, total, label): called as units of work complete."""


@dataclass(frozen=True)
class RunOptions:
    """How to run an experiment: the quick (CI) variant or the full one, how many seeds (None = default) and how
    many worker processes (None = in-process for --quick, ``default_workers()`` = 2 on a multi-core machine
    for a full run); ``cache`` is a folder keeping every finished unit, so an interrupted run resumes."""

    quick: bool = False
    seeds: int | None = None
    progress: Progress | None = None
    workers: int | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        if self.seeds is not None and self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")

    def worker_count(self) -> int:
        """The worker processes to use: ``workers`` if given, else 1 for a quick run and 2 for a full one."""
        if self.workers is not None:
            return self.workers
        return 1 if self.quick else default_workers()

    def seed_tuple(self, default: int | tuple[int, ...]) -> tuple[int, ...]:
        """Seeds 0..N-1 when N seeds were asked for, else the experiment's ``default`` (seeds, or a count)."""
        if self.seeds is not None:
            return tuple(range(self.seeds))
        return tuple(range(default)) if isinstance(default, int) else tuple(default)

    def report(self, done: int, total: int, label: str) -> None:
        """Forward progress to the callback, if any."""
        if self.progress is not None:
            self.progress(done, total, label)


@dataclass(frozen=True)
class Experiment:
    """A reproducible claim: its name, paper reference, summary, expected run times and the function running it."""

    name: str
    paper_ref: str
    summary: str
    full_time: str
    quick_time: str
    run: Callable[[RunOptions], ExperimentResult]


REGISTRY: dict[str, str] = {
    "phase": "safestep_lab.experiments.phase",
    "spike": "safestep_lab.experiments.spike",
    "archgrid": "safestep_lab.experiments.archgrid",
    "temperature": "safestep_lab.experiments.temperature",
    "directions": "safestep_lab.experiments.directions",
    "bottlenecks": "safestep_lab.experiments.bottlenecks",
    "natural": "safestep_lab.experiments.natural",
    "calibration": "safestep_lab.experiments.calibration",
    "belief-tracking": "safestep_lab.experiments.belief_tracking",
    "belief-slice": "safestep_lab.experiments.belief_slice",
    "lm-spike": "safestep_lab.experiments.lm_spike",
    "lm-calm": "safestep_lab.experiments.lm_calm",
    "lm-schedule": "safestep_lab.experiments.lm_schedule",
    "lm-binds": "safestep_lab.experiments.lm_binds",
    "lm-belief": "safestep_lab.experiments.lm_belief",
    "lm-defaults": "safestep_lab.experiments.lm_defaults",
    "lm-defaults-bpe": "safestep_lab.experiments.lm_defaults_bpe",
}


def load(name: str) -> Experiment:
    """Import and return the experiment called ``name`` (ValueError listing the known names otherwise)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(REGISTRY) or 'none'}")
    return importlib.import_module(REGISTRY[name]).EXPERIMENT
