"""Telemetry: bounded history, CSV / JSONL streaming and reading back, TensorBoard sink (with a stand-in writer), callback sink."""
import csv
import dataclasses
import importlib.util
import json
import math

import pytest

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
                      method="jvp", probe_size=16, skipped=skipped, seconds=0.01, step=step, reason="")


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
    assert writer.closed


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_sink_writes_event_files(tmp_path):
    sink = TensorBoardSink(tmp_path)
    sink.write(_report(0))
    sink.close()
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())


def test_report_metrics_by_hand():
    capped = StepReport(tau=4.0, rho=2.0, r_proposed=2.0, scale=0.5, r_applied=1.0, bound="ghost", method="jvp",
                        probe_size=16, skipped=False, seconds=0.0)
    assert report_metrics(capped, prefix="g/") == {"g/tau": 4.0, "g/rho": 2.0, "g/r_proposed": 2.0, "g/scale": 0.5,
                                                   "g/r_applied": 1.0, "g/capped": 1.0, "g/skipped": 0.0}
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


def test_callback_sink_that_raises_leaves_the_history_unchanged_and_bad_arguments():
    def fail(metrics, step):
        raise ConnectionError("tracker down")

    history = History(sinks=[CallbackSink(fail)])
    with pytest.raises(ConnectionError):
        history.append(_report(0))
    assert len(history) == 0
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
