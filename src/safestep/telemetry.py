"""Step reports of the SafeStep guard: a dataclass per step, a bounded history, and streaming sinks.

Sinks (CSV, JSON lines, TensorBoard) receive every report as it is recorded; TensorBoard is imported lazily
(``torch.utils.tensorboard`` needs the optional ``tensorboard`` package).
"""
from __future__ import annotations

import csv
import json
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = ["StepReport", "History", "ReportSink", "CSVSink", "JSONLSink", "TensorBoardSink"]


@dataclass(frozen=True)
class StepReport:
    """One guarded step: τ = ‖Δθ‖, ρ the radius along Δθ/τ, r = τ/ρ (before scaling), applied scale s.

    ``bound`` names the bound that produced ρ, ``method`` the slope estimator that ran ("jvp", "fd", or
    "none" when no probe was needed), ``probe_size`` the number of batch rows probed, ``skipped`` whether the
    parameters were left at θ0 (``reason`` says why), ``seconds`` the wall time of ``step()``, ``step`` the
    index of the guarded step (counted across checkpoints).
    """

    tau: float
    rho: float
    r: float
    scale: float
    bound: str
    method: str
    probe_size: int
    skipped: bool
    seconds: float
    step: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The report as a plain dict (field order preserved)."""
        return asdict(self)


FIELDS = tuple(f.name for f in fields(StepReport))


class ReportSink(Protocol):
    """Anything that consumes reports one at a time."""

    def write(self, report: StepReport) -> None: ...

    def close(self) -> None: ...


class _FileSink:
    """A sink that opens its file lazily (line-buffered) on the first report."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", newline="", buffering=1, encoding="utf-8")
            self._start(self._file)
        return self._file

    def _start(self, file: IO[str]) -> None:
        """Write a header, if the format has one."""

    def close(self) -> None:
        """Flush and close the file (a later report reopens and truncates it)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class CSVSink(_FileSink):
    """Stream reports to a CSV file with one header row (columns = StepReport fields)."""

    def _start(self, file: IO[str]) -> None:
        self._writer = csv.DictWriter(file, fieldnames=FIELDS)
        self._writer.writeheader()

    def write(self, report: StepReport) -> None:
        """Append one row."""
        self._open()
        self._writer.writerow(report.as_dict())


class JSONLSink(_FileSink):
    """Stream reports to a JSON-lines file; non-finite floats are written as the strings "inf"/"-inf"/"nan"."""

    def write(self, report: StepReport) -> None:
        """Append one JSON object."""
        self._open().write(json.dumps(_json_safe(report.as_dict())) + "\n")


def _json_safe(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class TensorBoardSink:
    """Log τ, ρ, r and s of every report as TensorBoard scalars under ``prefix`` (x-axis: the report's step)."""

    SCALARS = ("tau", "rho", "r", "scale", "seconds")

    def __init__(self, log_dir: str | Path | None = None, *, writer: Any = None, prefix: str = "safestep/") -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("TensorBoardSink needs the 'tensorboard' package: pip install safestep[tensorboard]") from err
            writer = SummaryWriter(log_dir=None if log_dir is None else str(log_dir))
        self.writer = writer
        self.prefix = prefix

    def write(self, report: StepReport) -> None:
        """Add one scalar per field in SCALARS, plus 1/0 for skipped."""
        for name in self.SCALARS:
            self.writer.add_scalar(self.prefix + name, getattr(report, name), report.step)
        self.writer.add_scalar(self.prefix + "skipped", float(report.skipped), report.step)

    def close(self) -> None:
        """Flush and close the writer."""
        self.writer.close()


class History:
    """The last ``maxlen`` reports (oldest dropped first), each also streamed to every sink."""

    def __init__(self, maxlen: int | None = 10_000, sinks: Iterable[ReportSink] = ()) -> None:
        if maxlen is not None and maxlen < 1:
            raise ValueError(f"maxlen must be a positive int or None (unbounded), got {maxlen}")
        self._reports: deque[StepReport] = deque(maxlen=maxlen)
        self.sinks: list[ReportSink] = list(sinks)

    @property
    def maxlen(self) -> int | None:
        """Capacity of the in-memory history."""
        return self._reports.maxlen

    def append(self, report: StepReport) -> None:
        """Record a report and stream it to the sinks."""
        self._reports.append(report)
        for sink in self.sinks:
            sink.write(report)

    def add_sink(self, sink: ReportSink) -> ReportSink:
        """Stream every future report to ``sink``; returns it."""
        self.sinks.append(sink)
        return sink

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()

    def records(self) -> list[dict[str, Any]]:
        """The stored reports as dicts, oldest first."""
        return [r.as_dict() for r in self._reports]

    def to_csv(self, path: str | Path) -> Path:
        """Write the stored reports to a CSV file; returns its path."""
        return self._dump(CSVSink(path))

    def to_jsonl(self, path: str | Path) -> Path:
        """Write the stored reports to a JSON-lines file; returns its path."""
        return self._dump(JSONLSink(path))

    def _dump(self, sink: "CSVSink | JSONLSink") -> Path:
        sink._open()
        for report in self._reports:
            sink.write(report)
        sink.close()
        return sink.path

    def __len__(self) -> int:
        return len(self._reports)

    def __iter__(self) -> Iterator[StepReport]:
        return iter(self._reports)

    def __getitem__(self, index: int) -> StepReport:
        return self._reports[index]
