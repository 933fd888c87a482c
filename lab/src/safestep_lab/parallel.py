"""Independent units of an experiment (one architecture, method and seed each) in worker processes.

``run_units(function, units, ...)`` returns ``[function(*unit) for unit in units]``. With one worker it runs in
this process; with more, in a pool of spawned processes using one torch thread each (the lab's models are tiny:
two single-threaded processes beat one two-threaded process on a 2-core machine). Units start in decreasing
order of their estimated cost (the longest first, so the pool does not end on one straggler), and progress is
reported in cost units, so a progress bar's ETA stays honest when units differ in length. With a ``cache``
folder every finished unit is pickled there as it completes and reused on the next call, so an interrupted full
run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["default_workers", "run_units"]

Result = TypeVar("Result")
Progress = Callable[[int, int, str], None]


def default_workers() -> int:
    """Worker processes for a full run: two, or one on a single-core machine."""
    return min(2, os.cpu_count() or 1)


def _single_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _cache_file(cache: Path, function: Callable[..., Any], unit: tuple[Any, ...]) -> Path:
    key = hashlib.sha256(repr((function.__module__, function.__qualname__, unit)).encode()).hexdigest()[:24]
    return cache / f"{key}.pickle"


def run_units(function: Callable[..., Result], units: Sequence[tuple[Any, ...]], workers: int = 1,
              progress: Progress | None = None, label: Callable[[tuple[Any, ...]], str] = str,
              cost: Callable[[tuple[Any, ...]], float] = lambda unit: 1.0,
              first: Callable[[tuple[Any, ...]], bool] = lambda unit: False,
              cache: str | Path | None = None) -> list[Result]:
    """``[function(*unit) for unit in units]``, in ``workers`` processes; progress(done, total, label) per unit.

    ``function`` and the units must be picklable when workers > 1 (a module-level function, plain arguments).
    ``done`` and ``total`` are in estimated cost units (``cost(unit)``, rounded to integers ≥ 1 per unit).
    Units with ``first(unit)`` start before the others; within each group the most expensive start first.
    ``cache``: a folder where each finished unit is stored, keyed by the function and the unit's repr.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    weights = [max(1, round(cost(unit))) for unit in units]
    total, done, count = sum(weights), 0, 0
    order = sorted(range(len(units)), key=lambda i: (not first(units[i]), -weights[i]))
    results: list[Any] = [None] * len(units)
    folder = None if cache is None else Path(cache)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)

    def finished(index: int, value: Result) -> None:
        nonlocal done, count
        results[index] = value
        if folder is not None:
            path = _cache_file(folder, function, units[index])
            if not path.exists():
                path.with_suffix(".tmp").write_bytes(pickle.dumps(value))
                path.with_suffix(".tmp").replace(path)
        done, count = done + weights[index], count + 1
        if progress is not None:
            progress(done, total, f"{label(units[index])} ({count}/{len(units)} units)")

    if folder is not None:
        cached = [i for i in order if _cache_file(folder, function, units[i]).exists()]
        for index in cached:
            finished(index, pickle.loads(_cache_file(folder, function, units[index]).read_bytes()))
        order = [i for i in order if i not in set(cached)]
    if workers == 1 or len(order) <= 1:
        for index in order:
            finished(index, function(*units[index]))
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_single_thread) as pool:
        pending = {pool.submit(function, *units[index]): index for index in order}
        while pending:
            complete, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in complete:
                finished(pending.pop(future), future.result())
    return results
