"""Telemetry: bounded history, CSV / JSONL streaming, resuming and reading back, TensorBoard sink (with a stand-in
writer), callback sink and its step choices under W&B's step rule (a fake that enforces it)."""
import csv
import dataclasses
import importlib.util
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from _small import small_data, small_mlp

from safestep import SafeStep
from safestep.telemetry import (
    CallbackSink,
    CSVSink,
    History,
    JSONLSink,
    StepReport,
    TensorBoardSink,
    json_ready,
    read_reports,
    report_metrics,
)


def _report(step, rho=2.0, skipped=False):
    scale = min(1.0, rho)
    return StepReport(tau=1.0, rho=rho, r_proposed=1.0 / rho, scale=scale, r_applied=scale / rho, bound="ghost",
                      method="jvp", rows_probed=2, skipped=skipped, seconds=0.01, step=step, reason="",
                      rows_in_batch=16)


def test_history_is_bounded_and_keeps_the_newest():
    history = History(maxlen=3)
    for i in range(5):
        history.append(_report(i))
    assert len(history) == 3 and history.maxlen == 3
    assert [r.step for r in history] == [2, 3, 4]
    assert history[-1].step == 4 and history.records()[0]["step"] == 2


def test_history_rejects_bad_maxlen():
    with pytest.raises(ValueError, match="maxlen"):
        History(maxlen=0)


def test_csv_sink_streams_rows_that_read_back(tmp_path):
    path = tmp_path / "sub" / "steps.csv"
    history = History(sinks=[CSVSink(path)])
    history.append(_report(0, rho=math.inf))
    history.append(_report(1, skipped=True))
    with open(path, newline="") as f:  # streamed: readable before close
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert float(rows[0]["rho"]) == math.inf and rows[1]["skipped"] == "True"
    history.close()


def test_jsonl_sink_and_dumps(tmp_path):
    path = tmp_path / "steps.jsonl"
    history = History(sinks=[JSONLSink(path)])
    history.append(_report(0, rho=math.inf))
    history.append(_report(1))
    history.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["rho"] == "inf" and lines[1]["rho"] == 2.0 and lines[1]["method"] == "jvp"
    dumped = history.to_jsonl(tmp_path / "again.jsonl").read_text()
    assert dumped == path.read_text()
    csv_path = history.to_csv(tmp_path / "all.csv")
    assert len(csv_path.read_text().splitlines()) == 3


def test_empty_history_dumps_a_header(tmp_path):
    assert History().to_csv(tmp_path / "e.csv").read_text().startswith("tau,rho,r_proposed,scale,r_applied")


def test_tensorboard_sink_with_stand_in_writer():
    class Writer:
        def __init__(self):
            self.calls, self.closed = [], False

        def add_scalar(self, tag, value, step):
            self.calls.append((tag, value, step))

        def close(self):
            self.closed = True

    writer = Writer()
    sink = TensorBoardSink(writer=writer)
    sink.write(_report(7, rho=4.0))
    sink.close()
    assert ("safestep/rho", 4.0, 7) in writer.calls and ("safestep/skipped", 0.0, 7) in writer.calls
    assert ("safestep/rows_probed", 2, 7) in writer.calls and ("safestep/rows_in_batch", 16, 7) in writer.calls
    assert writer.closed


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_sink_writes_event_files(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.write(_report(0))
    sink.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_report_metrics_by_hand():
    capped = StepReport(tau=4.0, rho=2.0, r_proposed=2.0, scale=0.5, r_applied=1.0, bound="ghost", method="jvp",
                        rows_probed=2, skipped=False, seconds=0.0, rows_in_batch=16)
    assert report_metrics(capped, prefix="g/") == {"g/tau": 4.0, "g/rho": 2.0, "g/r_proposed": 2.0, "g/scale": 0.5,
                                                   "g/r_applied": 1.0, "g/capped": 1.0, "g/skipped": 0.0,
                                                   "g/rows_probed": 2.0, "g/rows_in_batch": 16.0}
    skipped = report_metrics(_report(3, skipped=True))
    assert skipped["safestep/skipped"] == 1.0 and skipped["safestep/capped"] == 0.0


def test_callback_sink_passes_flat_metrics_and_the_step_every_nth_report():
    calls = []
    history = History(sinks=[CallbackSink(lambda metrics, step: calls.append((step, metrics)), every=3, prefix="s/")])
    for i in range(7):
        history.append(_report(i, rho=0.5 + i))
    assert [step for step, _ in calls] == [0, 3, 6]
    for step, metrics in calls:
        assert metrics == report_metrics(history[step], "s/")


def test_callback_sink_that_raises_misses_only_its_copy_and_bad_arguments():
    def fail(metrics, step):
        raise ConnectionError("tracker down")

    calls = []
    history = History(sinks=[CallbackSink(fail), CallbackSink(lambda metrics, step: calls.append(step))])
    with pytest.raises(ConnectionError):
        history.append(_report(0))
    assert len(history) == 1 and calls == [0]  # the history and the other sinks still got the report
    with pytest.raises(ValueError, match="callable"):
        CallbackSink("wandb.log")
    for every in (0, 1.5, True):
        with pytest.raises(ValueError, match="every"):
            CallbackSink(print, every=every)


@pytest.mark.parametrize("writer", ["csv", "jsonl"])
def test_read_reports_round_trips_what_the_sinks_wrote(tmp_path, writer):
    history = History()
    reports = [_report(0, rho=math.inf), _report(1, skipped=True), _report(2, rho=0.25)]
    reports.append(dataclasses.replace(_report(3), tau=math.nan, reason='non-finite update, "quoted"'))
    for report in reports:
        history.append(report)
    path = history.to_csv(tmp_path / "h.csv") if writer == "csv" else history.to_jsonl(tmp_path / "h.jsonl")
    back = read_reports(path)
    assert [r.as_dict() for r in back[:3]] == [r.as_dict() for r in reports[:3]]
    assert math.isnan(back[3].tau) and back[3].reason == reports[3].reason and back[3].step == 3
    assert back[1].skipped is True and back[0].skipped is False and isinstance(back[0].rows_probed, int)


def test_read_reports_names_the_file_and_line_of_what_is_not_a_report(tmp_path):
    good = json.dumps(json_ready(_report(0).as_dict()))
    cases = {
        "bad.jsonl": (good + "\n" + good.replace('"tau": 1.0, ', "") + "\n", r"bad.jsonl:2: .*missing tau"),
        "broken.jsonl": (good + "\n{not json\n", "not a CSV or JSON-lines file"),
        "other.csv": ("a,b\n1,2\n", "header lacks tau"),
        "typed.jsonl": (good.replace('"skipped": false', '"skipped": "maybe"') + "\n", r"typed.jsonl:1: .*True or False"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_reports(tmp_path / name)
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="not a text file"):
        read_reports(tmp_path / "binary.csv")
    with pytest.raises(FileNotFoundError):
        read_reports(tmp_path / "missing.jsonl")


class FakeWandb:
    """W&B's documented step rule: ``log(data)`` writes to the current step and advances it; ``log(data, step=s)``
    with s lower than the current step is dropped with a warning, s equal to it adds to the current row (kept open
    until a call commits), s higher first closes the current row. Rows are kept as {step: merged data}."""

    def __init__(self):
        self.step, self.rows, self._open = 0, {}, {}

    def log(self, data, step=None, commit=None):
        if step is not None and step < self.step:
            warnings.warn(f"Tried to log to step {step} that is less than the current step {self.step}. Steps must "
                          "be monotonically increasing, so this data will be ignored.")
            return
        if step is not None and step > self.step:
            self._commit()
            self.step = step
        self._open.update(data)
        if commit or (commit is None and step is None):
            self._commit()
            self.step += 1

    def _commit(self):
        if self._open:
            self.rows[self.step] = self._open
            self._open = {}

    def finish(self):
        self._commit()

    def guard_rows(self):
        return {step: row for step, row in self.rows.items() if "safestep/tau" in row}


def _train_loop_logging_per_micro_batch(sink, tracker, steps=3, micro_batches=4):
    """A loop that logs its loss on every micro-batch (W&B's step advances 4 times per optimizer step)."""
    history = History(sinks=[sink])
    for step in range(steps):
        for _ in range(micro_batches):
            tracker.log({"train/loss": 1.0})
        history.append(_report(step))
    tracker.finish()


def test_callback_sink_with_the_report_step_loses_every_guard_metric_to_wandb_s_step_rule():
    tracker = FakeWandb()
    with pytest.warns(UserWarning, match="less than the current step"):
        _train_loop_logging_per_micro_batch(CallbackSink(tracker.log), tracker)
    assert tracker.guard_rows() == {}  # why the W&B recipe passes step=None (docs/integrations.md)


@pytest.mark.parametrize("choice", ["no step", "step key", "step function"])
def test_callback_sink_step_choices_keep_every_guard_metric_under_wandb_s_step_rule(choice):
    tracker = FakeWandb()
    sink = {"no step": CallbackSink(tracker.log, step=None),
            "step key": CallbackSink(tracker.log, step=None, step_key="safestep/step"),
            "step function": CallbackSink(tracker.log, step=lambda report: tracker.step)}[choice]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_loop_logging_per_micro_batch(sink, tracker)
    rows = tracker.guard_rows()
    assert len(rows) == 3 and all(row["safestep/rows_probed"] == 2.0 for row in rows.values())
    if choice == "step key":
        assert [row["safestep/step"] for row in rows.values()] == [0, 1, 2]
    if choice == "step function":  # the tracker's current step: merged into the loop's rows, none added
        assert sorted(rows) == [4, 8, 12] and len(tracker.rows) == 13


def test_callback_sink_passes_the_chosen_step_and_rejects_bad_choices():
    calls = []
    report = _report(5)
    CallbackSink(lambda metrics, **kw: calls.append(kw), step=lambda r: 10 * r.step).write(report)
    CallbackSink(lambda metrics, **kw: calls.append(kw)).write(report)
    CallbackSink(lambda metrics, **kw: calls.append(kw), step=None).write(report)
    assert calls == [{"step": 50}, {"step": 5}, {}]
    for bad in ("global", 3):
        with pytest.raises(ValueError, match="step must be"):
            CallbackSink(print, step=bad)
    with pytest.raises(ValueError, match="step_key"):
        CallbackSink(print, step_key="")


SINKS = {"csv": CSVSink, "jsonl": JSONLSink}


def _write(sink_class, path, steps, rho, **options):
    sink = sink_class(path, **options)
    history = History(sinks=[sink])
    for step in steps:
        history.append(_report(step, rho=rho))
    history.close()


@pytest.mark.parametrize("kind", SINKS)
def test_file_sink_resumed_from_a_checkpoint_keeps_earlier_rows_once(tmp_path, kind):
    path = tmp_path / f"steps.{kind}"
    _write(SINKS[kind], path, range(6), rho=2.0)  # the first run crashed after step 5; the checkpoint was at step 3
    _write(SINKS[kind], path, range(3, 8), rho=4.0)
    back = read_reports(path)
    assert [r.step for r in back] == list(range(8))
    assert [r.rho for r in back] == [2.0] * 3 + [4.0] * 5  # steps 3-5 of the crashed run were replaced, not repeated


@pytest.mark.parametrize("kind", SINKS)
def test_file_sink_new_run_or_resume_false_starts_afresh(tmp_path, kind):
    path = tmp_path / f"steps.{kind}"
    _write(SINKS[kind], path, range(4), rho=2.0)
    _write(SINKS[kind], path, range(2), rho=4.0)  # a new run (step 0): never mixed with the old one
    assert [(r.step, r.rho) for r in read_reports(path)] == [(0, 4.0), (1, 4.0)]
    _write(SINKS[kind], path, range(5, 7), rho=8.0, resume=False)
    assert [(r.step, r.rho) for r in read_reports(path)] == [(5, 8.0), (6, 8.0)]
    with pytest.raises(ValueError, match="resume"):
        SINKS[kind](path, resume="yes")


@pytest.mark.parametrize("kind", SINKS)
@pytest.mark.parametrize("first_step", [0, 4])
def test_file_sink_never_overwrites_a_file_that_is_not_a_history(tmp_path, kind, first_step):
    path = tmp_path / f"notes.{kind}"
    path.write_text("my notes, not step reports\n")
    sink = SINKS[kind](path)
    with pytest.raises(ValueError, match="refusing to overwrite"):
        sink.write(_report(first_step))
    assert path.read_text() == "my notes, not step reports\n"


@pytest.mark.parametrize("kind", SINKS)
def test_file_sink_resume_drops_a_torn_last_line_and_leaves_no_temporary_file(tmp_path, kind):
    path = tmp_path / f"steps.{kind}"
    _write(SINKS[kind], path, range(3), rho=2.0)
    with open(path, "a") as f:
        f.write('{"tau": 1.0, "rho"' if kind == "jsonl" else "1.0,2.0,0.5")  # killed in the middle of a write
    _write(SINKS[kind], path, range(3, 5), rho=4.0)
    assert [r.step for r in read_reports(path)] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_file_sink_resume_warns_about_missing_steps(tmp_path):
    path = tmp_path / "steps.jsonl"
    _write(JSONLSink, path, range(3), rho=2.0)
    with pytest.warns(RuntimeWarning, match="ends at step 2 but this run continues from step 10"):
        _write(JSONLSink, path, [10], rho=2.0)
    assert [r.step for r in read_reports(path)] == [0, 1, 2, 10]


def test_csv_written_before_rows_in_batch_reads_back_and_resumes_with_the_current_header(tmp_path):
    path = tmp_path / "old.csv"
    old_fields = [name for name in dataclasses.asdict(_report(0)) if name != "rows_in_batch"]
    old_fields[old_fields.index("rows_probed")] = "probe_size"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields)
        writer.writeheader()
        for step in range(3):
            row = _report(step).as_dict()
            row["probe_size"] = row.pop("rows_probed")
            row.pop("rows_in_batch")
            writer.writerow(row)
    assert [(r.rows_probed, r.rows_in_batch) for r in read_reports(path)] == [(2, 0)] * 3
    _write(CSVSink, path, range(2, 4), rho=4.0)
    assert path.read_text().startswith("tau,rho,r_proposed,scale,r_applied,bound,method,rows_probed,")
    assert [(r.step, r.rho) for r in read_reports(path)] == [(0, 2.0), (1, 2.0), (2, 4.0), (3, 4.0)]


def test_guard_resumed_from_its_state_dict_continues_the_jsonl_history(tmp_path):
    path = tmp_path / "run" / "steps.jsonl"
    x, y = small_data(32, 4)

    def train(model, guard, steps):
        for _ in range(steps):
            guard.zero_grad()
            F.cross_entropy(model(x), y).backward()
            guard.step()

    model = small_mlp(4)
    guard = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, sinks=[JSONLSink(path)])
    train(model, guard, 3)
    checkpoint = {"model": model.state_dict(), "optimizer": guard.state_dict()}
    train(model, guard, 2)  # steps 3 and 4, then the run dies
    guard.history.close()
    model = small_mlp(4, seed=1)
    model.load_state_dict(checkpoint["model"])
    guard = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, sinks=[JSONLSink(path)])
    guard.load_state_dict(checkpoint["optimizer"])
    train(model, guard, 4)
    guard.history.close()
    assert [r.step for r in read_reports(path)] == list(range(7))
