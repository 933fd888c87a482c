"""Telemetry: bounded history, CSV / JSONL streaming, TensorBoard sink (with a stand-in writer)."""
import csv
import importlib.util
import json
import math

import pytest

from safestep.telemetry import CSVSink, History, JSONLSink, StepReport, TensorBoardSink


def _report(step, rho=2.0, skipped=False):
    return StepReport(tau=1.0, rho=rho, r=1.0 / rho, scale=min(1.0, rho), bound="ghost", method="jvp",
                      probe_size=16, skipped=skipped, seconds=0.01, step=step, reason="")


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
    assert History().to_csv(tmp_path / "e.csv").read_text().startswith("tau,rho,r,scale")


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
