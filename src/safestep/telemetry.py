"""Step reports of the SafeStep guard: a dataclass per step, a bounded history, and streaming sinks.

Sinks (CSV, JSON lines, TensorBoard, a user function) receive every report as it is recorded; TensorBoard is
imported lazily (``torch.utils.tensorboard`` needs the optional ``tensorboard`` package). ``read_reports`` reads
back what the CSV and JSON-lines sinks wrote.
"""
from __future__ import annotations

import csv
import json
import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any, Protocol, get_type_hints

__all__ = ["StepReport", "History", "ReportSink", "CSVSink", "JSONLSink", "TensorBoardSink", "json_ready",
           "DEFAULT_PREFIX", "report_metrics", "CallbackSink", "read_reports"]


@dataclass(frozen=True)
class StepReport:
    """One guarded step: the proposed update's length τ = ‖Δθ‖, the radius ρ along it, and what was applied.

    ``r_proposed = τ/ρ`` is the inner optimizer's step in radius units (before scaling); ``scale`` is the factor s
    applied to Δθ and ``r_applied = s·τ/ρ`` the applied step in radius units (at most the guard's ``r`` in cap
    mode; 0 when skipped). ``bound`` names the bound that set ρ (the binding member of a minimum of bounds),
    ``method`` the slope estimator that ran ("jvp", "fd", or "none" when no probe was needed), ``rows_probed`` the
    number of batch rows (samples or sequences) the probe covered and ``rows_in_batch`` the batch rows there were,
    ``skipped`` whether the parameters were left at θ0 (``reason`` says why), ``seconds`` the wall time of ``step()``, ``step`` the index of the guarded step (counted across checkpoints).
    """

    tau: float
    rho: float
    r_proposed: float
    scale: float
    r_applied: float
    bound: str
    method: str
    rows_probed: int
    skipped: bool
    seconds: float
    step: int = 0
    reason: str = ""
    rows_in_batch: int = 0

    @property
    def capped(self) -> bool:
        """True when an applied step was shortened (0 < s < 1)."""
        return not self.skipped and 0.0 < self.scale < 1.0

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
        self._open().write(json.dumps(json_ready(report.as_dict())) + "\n")


def json_ready(value: Any) -> Any:
    """Recursively convert to JSON types; non-finite floats become "nan", "inf" or "-inf" (the one JSON encoder)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):
        return json_ready(value.tolist())
    return value


class TensorBoardSink:
    """Log τ, ρ, r and s of every report as TensorBoard scalars under ``prefix`` (x-axis: the report's step)."""

    SCALARS = ("tau", "rho", "r_proposed", "scale", "r_applied", "seconds")

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


DEFAULT_PREFIX = "safestep/"
"""The prefix of every metric name given to a logger (``safestep/tau``, ...)."""


def report_metrics(report: StepReport, prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """{prefix+name: value} for τ, ρ, r_proposed = τ/ρ, s, r_applied = s·τ/ρ, capped (1 if 0 < s < 1) and skipped (1/0)."""
    return {
        prefix + "tau": report.tau,
        prefix + "rho": report.rho,
        prefix + "r_proposed": report.r_proposed,
        prefix + "scale": report.scale,
        prefix + "r_applied": report.r_applied,
        prefix + "capped": float(report.capped),
        prefix + "skipped": float(report.skipped),
    }


class CallbackSink:
    """Call ``fn(report_metrics(report, prefix), step=report.step)`` for every report whose step is a multiple of ``every``.

    That signature is the one of ``wandb.log``, ``mlflow.log_metrics`` and ``accelerate.Accelerator.log``, so
    ``CallbackSink(wandb.log)`` streams the guard's metrics to Weights & Biases. ``fn`` runs inside the guarded
    step, like every sink: an exception it raises rolls the step back (docs/step.md) and propagates.
    """

    def __init__(self, fn: Callable[..., Any], *, every: int = 1, prefix: str = DEFAULT_PREFIX) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.fn = fn
        self.every = every
        self.prefix = prefix

    def write(self, report: StepReport) -> None:
        """Pass the report's metrics and step to ``fn`` (every ``every``-th step only)."""
        if report.step % self.every == 0:
            self.fn(report_metrics(report, self.prefix), step=report.step)

    def close(self) -> None:
        """Nothing to flush: ``fn`` owns its destination."""


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
        """Stream a report to the sinks, then record it; a sink that raises leaves the history unchanged."""
        for sink in self.sinks:
            sink.write(report)
        self._reports.append(report)

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


_FIELD_TYPES: dict[str, type] = get_type_hints(StepReport)


def read_reports(path: str | Path) -> list[StepReport]:
    """The reports in a file written by ``CSVSink``/``JSONLSink`` (or ``History.to_csv``/``to_jsonl``), oldest first.

    The format is read from the content (a first line starting with "{" is JSON lines). Raises OSError when the
    file cannot be read and ValueError, naming the file and line, when it does not hold step reports.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    try:
        records = _json_records(lines) if lines and lines[0].lstrip().startswith("{") else _csv_records(lines)
    except (csv.Error, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not a CSV or JSON-lines file of step reports ({error})") from None
    return [_report_from_record(record, f"{path}:{number}") for number, record in records]


def _json_records(lines: list[str]) -> list[tuple[int, Any]]:
    """(line number, decoded object) of every non-blank line."""
    return [(number, json.loads(line)) for number, line in enumerate(lines, 1) if line.strip()]


def _csv_records(lines: list[str]) -> list[tuple[int, Any]]:
    """(line number, row dict) of every data row, after checking that the header names every report field."""
    reader = csv.DictReader(lines)
    if not reader.fieldnames:  # an empty file: no header, no rows
        return []
    missing = [name for name in FIELDS if name not in (reader.fieldnames or ())]
    if missing:
        raise csv.Error(f"the header lacks {', '.join(missing)}")
    return [(reader.line_num, row) for row in reader]


def _report_from_record(record: Any, where: str) -> StepReport:
    """A StepReport from one CSV row or JSON object (non-finite floats and booleans may be strings)."""
    missing = [name for name in FIELDS if not isinstance(record, dict) or record.get(name) is None]
    if missing:
        raise ValueError(f"{where}: not a step report (missing {', '.join(missing)})")
    try:
        return StepReport(**{name: _parse(_FIELD_TYPES[name], record[name]) for name in FIELDS})
    except ValueError as error:
        raise ValueError(f"{where}: not a step report ({error})") from None


def _parse(kind: type, value: Any) -> Any:
    """``value`` as ``kind``: floats from numbers or "inf"/"nan", ints, booleans from true/false or "True"/"False"."""
    if kind is bool:
        if isinstance(value, bool) or value in ("True", "False"):
            return value in (True, "True")
        raise ValueError(f"expected True or False, got {value!r}")
    if kind is str:
        return str(value)
    return kind(value)
