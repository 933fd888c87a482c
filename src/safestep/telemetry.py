"""Step reports of the SafeStep guard: a dataclass per step, a bounded history, and streaming sinks.

Sinks (CSV, JSON lines, TensorBoard, a user function) receive every report as it is recorded; ``read_reports``
reads back what the file sinks wrote. A file sink resumes at its first report's step k: it keeps the rows of steps
before k, drops the later ones and appends (``resume=False``: afresh); a file that does not hold step reports is
never overwritten (docs/integrations.md, "Files that survive a restart").
"""
from __future__ import annotations

import csv
import json
import math
import os
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO, Any, Protocol, get_type_hints

__all__ = ["StepReport", "History", "ReportSink", "CSVSink", "JSONLSink", "TensorBoardSink", "json_ready",
           "DEFAULT_PREFIX", "report_metrics", "CallbackSink", "StepChoice", "read_reports"]


@dataclass(frozen=True)
class StepReport:
    """One guarded step: the proposed update's length τ = ‖Δθ‖, the radius ρ along it, and what was applied.

    ``r_proposed = τ/ρ`` (before scaling), ``scale`` s and ``r_applied = s·τ/ρ`` (0 when skipped) as in
    docs/integrations.md, "What is logged"; ``bound`` names the bound that set ρ (the binding member of a minimum),
    ``method`` the slope estimator that ran ("jvp", "fd", "reuse"; "none" without a probe), ``skipped`` whether
    the parameters were left at θ0 (``reason`` says why), ``seconds`` the wall time of ``step()``, ``step`` its
    index (counted across checkpoints).
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
    """A sink that opens its file (line-buffered) on the first report, resuming from that report's step."""

    def __init__(self, path: str | Path, *, resume: bool = True) -> None:
        if not isinstance(resume, bool):
            raise ValueError(f"resume must be True or False, got {resume!r}")
        self.path = Path(path)
        self.resume = resume
        self._file: IO[str] | None = None

    def _open(self, first_step: int = 0) -> IO[str]:
        """The open file; on the first call, the existing file is checked, cut back to the steps before
        ``first_step`` (when resuming) and opened for appending, or started afresh."""
        if self._file is None:
            kept, intact = self._existing(first_step if self.resume else 0)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if kept and not intact:
                self._rewrite(kept)
            self._file = open(self.path, "a" if kept else "w", newline="", buffering=1, encoding="utf-8")
            if not kept:
                self._start(self._file)
        return self._file

    def _existing(self, first_step: int) -> tuple[list[StepReport], bool]:
        """(the file's reports of steps before ``first_step``, whether the file holds exactly those, as this sink
        writes them). Raises ValueError, before anything is written, when the file holds something else."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return [], True
        except (UnicodeDecodeError, IsADirectoryError):
            raise ValueError(f"{self.path} is not a file of step reports: refusing to overwrite it") from None
        complete = text[: text.rfind("\n") + 1]  # a last line without its newline is a torn write: dropped
        try:
            reports = _reports_in(complete.splitlines(), str(self.path))
        except ValueError as error:
            raise ValueError(f"{error}; refusing to overwrite it (give another path)") from None
        kept = [report for report in reports if report.step < first_step]
        if kept and kept[-1].step < first_step - 1:
            warnings.warn(f"{self.path}: the history ends at step {kept[-1].step} but this run continues from step "
                          f"{first_step}; steps in between are missing (was the file written by another run?)",
                          RuntimeWarning, stacklevel=4)
        intact = len(kept) == len(reports) and complete == text and self._appendable(complete)
        return kept, intact

    def _appendable(self, text: str) -> bool:
        """True when rows this sink writes can follow ``text`` as it is."""
        return True

    def _rewrite(self, reports: list[StepReport]) -> None:
        """Replace the file by ``reports`` atomically (a temporary file in the same folder, then a rename)."""
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", newline="", encoding="utf-8") as file:
                self._start(file)
                for report in reports:
                    self._row(file, report)
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _start(self, file: IO[str]) -> None:
        """Write a header, if the format has one."""

    def _row(self, file: IO[str], report: StepReport) -> None:
        """Write one report (each format defines it)."""
        raise NotImplementedError

    def write(self, report: StepReport) -> None:
        """Append one row (the first report opens the file, see ``_open``)."""
        self._row(self._open(report.step), report)

    def close(self) -> None:
        """Flush and close the file (a later report reopens it, resuming from that report's step)."""
        if self._file is not None:
            self._file.close()
            self._file = None


class CSVSink(_FileSink):
    """Stream reports to a CSV file with one header row (columns = StepReport fields)."""

    def _start(self, file: IO[str]) -> None:
        csv.DictWriter(file, fieldnames=FIELDS).writeheader()

    def _appendable(self, text: str) -> bool:
        header = next(csv.reader(text.splitlines()[:1]), [])
        return tuple(header) == FIELDS  # a file with other columns (an older version) is rewritten

    def _row(self, file: IO[str], report: StepReport) -> None:
        csv.DictWriter(file, fieldnames=FIELDS).writerow(report.as_dict())


class JSONLSink(_FileSink):
    """Stream reports to a JSON-lines file; non-finite floats are written as the strings "inf"/"-inf"/"nan"."""

    def _row(self, file: IO[str], report: StepReport) -> None:
        file.write(json.dumps(json_ready(report.as_dict())) + "\n")


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
    """Log τ, ρ, r, s and the probe's coverage of every report as TensorBoard scalars under ``prefix`` (x-axis: the
    report's step)."""

    SCALARS = ("tau", "rho", "r_proposed", "scale", "r_applied", "seconds", "rows_probed", "rows_in_batch")

    def __init__(self, log_dir: str | Path | None = None, *, writer: Any = None, prefix: str = "safestep/") -> None:
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # pragma: no cover - depends on the environment
                raise ImportError("TensorBoardSink needs the 'tensorboard' package: "
                                  "pip install safestep[tensorboard]") from err
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


_METRICS = ("tau", "rho", "r_proposed", "scale", "r_applied", "capped", "skipped", "rows_probed", "rows_in_batch")
DEFAULT_PREFIX = "safestep/"
"""The prefix of every metric name given to a logger (``safestep/tau``, ...)."""


def report_metrics(report: StepReport, prefix: str = DEFAULT_PREFIX) -> dict[str, float]:
    """{prefix+name: value} for τ, ρ, r_proposed = τ/ρ, s, r_applied = s·τ/ρ, capped (1 if 0 < s < 1), skipped (1/0),
    and what the certificate covered: rows_probed of rows_in_batch batch rows."""
    return {prefix + name: float(getattr(report, name)) for name in _METRICS}


StepChoice = str | None | Callable[[StepReport], int]
"""What ``CallbackSink`` passes as ``step=``: "report" (the report's step), None (no step argument) or a function."""


class CallbackSink:
    """Call ``fn(report_metrics(report, prefix), step=...)`` for every report whose step is a multiple of ``every``.

    ``step``: "report" passes ``report.step`` (optimizer steps, counted across checkpoints), None passes none (the
    tracker counts: W&B needs this), a function ``step(report) -> int`` passes its value; ``step_key`` also puts
    ``report.step`` into the metrics under that key. An exception ``fn`` raises leaves the step applied and
    recorded, and propagates after the other sinks had the report (docs/integrations.md, "Any tracker").
    """

    def __init__(self, fn: Callable[..., Any], *, every: int = 1, prefix: str = DEFAULT_PREFIX,
                 step: StepChoice = "report", step_key: str | None = None) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not (step is None or step == "report" or (callable(step) and not isinstance(step, str))):
            raise ValueError(f"step must be 'report', None or a function of the report, got {step!r}")
        if step_key is not None and not (isinstance(step_key, str) and step_key):
            raise ValueError(f"step_key must be a non-empty str or None, got {step_key!r}")
        self.fn = fn
        self.every = every
        self.prefix = prefix
        self.step = step
        self.step_key = step_key

    def write(self, report: StepReport) -> None:
        """Pass the report's metrics (and the chosen step) to ``fn`` (every ``every``-th step only)."""
        if report.step % self.every != 0:
            return
        metrics: dict[str, Any] = report_metrics(report, self.prefix)
        if self.step_key is not None:
            metrics[self.step_key] = report.step
        if self.step is None:
            self.fn(metrics)
        else:
            self.fn(metrics, step=report.step if self.step == "report" else self.step(report))

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
        """Record a report and stream it to every sink; a sink that raises misses only this report (the others and
        the history still get it), and the first sink error is raised once all have been called."""
        self._reports.append(report)
        errors: list[BaseException] = []
        for sink in self.sinks:
            try:
                sink.write(report)
            except Exception as error:  # noqa: BLE001 -- re-raised below, after every sink had its turn
                errors.append(error)
        if errors:
            if hasattr(errors[0], "add_note"):
                errors[0].add_note(f"safestep: step {report.step} was applied and recorded; {len(errors)} sink(s) "
                                   "could not write its report")
            raise errors[0]

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
        """Write the stored reports to a new CSV file (replacing a file of step reports); returns its path."""
        return self._dump(CSVSink(path, resume=False))

    def to_jsonl(self, path: str | Path) -> Path:
        """Write the stored reports to a new JSON-lines file (replacing a file of step reports); returns its path."""
        return self._dump(JSONLSink(path, resume=False))

    def _dump(self, sink: _FileSink) -> Path:
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
_OPTIONAL = {"reason": "", "rows_in_batch": 0}  # fields that files of earlier versions lack, with their value
_RENAMED = {"rows_probed": "probe_size"}  # fields under their earlier column name


def read_reports(path: str | Path) -> list[StepReport]:
    """The reports in a file written by ``CSVSink``/``JSONLSink`` (or ``History.to_csv``/``to_jsonl``), oldest first;
    a first line starting with "{" is JSON lines. Raises OSError when the file cannot be read and ValueError, naming
    the file and line, when it does not hold step reports."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file") from None
    return _reports_in(lines, str(path))


def _reports_in(lines: list[str], where: str) -> list[StepReport]:
    """The reports in the lines of a CSV or JSON-lines file named ``where`` (ValueError when they are not reports)."""
    try:
        if lines and lines[0].lstrip().startswith("{"):  # JSON lines: one object per non-blank line
            records = [(number, json.loads(line)) for number, line in enumerate(lines, 1) if line.strip()]
        else:
            records = _csv_records(lines)
    except (csv.Error, json.JSONDecodeError) as error:
        raise ValueError(f"{where}: not a CSV or JSON-lines file of step reports ({error})") from None
    return [_report_from_record(record, f"{where}:{number}") for number, record in records]


def _csv_records(lines: list[str]) -> list[tuple[int, Any]]:
    """(line number, row dict) of every data row, after checking that the header names every report field."""
    reader = csv.DictReader(lines)
    if not reader.fieldnames:  # an empty file: no header, no rows
        return []
    known = set(reader.fieldnames) | _OPTIONAL.keys()
    missing = [name for name in FIELDS if name not in known and _RENAMED.get(name) not in known]
    if missing:
        raise csv.Error(f"the header lacks {', '.join(missing)}")
    return [(reader.line_num, row) for row in reader]


def _report_from_record(record: Any, where: str) -> StepReport:
    """A StepReport from one CSV row or JSON object (non-finite floats and booleans may be strings; an older file's
    renamed fields are read under their current name, the optional ones it lacks as their default)."""
    if isinstance(record, dict):
        record = dict(record)
        for name, old in _RENAMED.items():
            if record.get(name) is None and old in record:
                record[name] = record[old]
        for name, default in _OPTIONAL.items():
            if record.get(name) in (None, ""):
                record[name] = default
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
    return kind(value)
