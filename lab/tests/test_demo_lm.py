"""`safestep demo --lm`: the ×1000 spike on text, in process (quick) and through the CLI (slow)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from safestep.cli import build_parser, main
from safestep_lab.demo_lm import LMDemoConfig, format_lm_table, run_lm_demo, write_lm_outputs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    config = LMDemoConfig(steps=40, spike_start=10, spike_steps=20, eval_every=10, monitor_every=5, val_windows=16)
    ticks = []
    result = run_lm_demo(config, progress=lambda n, label: ticks.append(n), workers=1)
    out = tmp_path_factory.mktemp("demo_lm")
    return result, write_lm_outputs(result, out), ticks


def test_quick_config_holds_a_30_step_spike_and_bad_windows_are_refused():
    config = LMDemoConfig.for_steps(400, quick=True)
    assert config.steps == 60 and config.spike_steps == 30 and config.spike_factor == 1000.0
    full = LMDemoConfig.for_steps(400)
    assert (full.spike_start, full.spike_steps, full.monitor_every) == (100, 30, 10)
    with pytest.raises(ValueError, match="spike"):
        LMDemoConfig(steps=50, spike_start=40, spike_steps=30)
    with pytest.raises(ValueError, match="unknown"):
        LMDemoConfig(methods=("plain", "adam"))


def test_the_demo_shows_safestep_surviving_the_spike(demo):
    result, _, ticks = demo
    assert sum(ticks) == 3 * result.config.steps
    plain, clip, guarded = (result.runs[m]["final_val_loss"] for m in ("plain", "clip", "safestep"))
    assert guarded < 10 and plain > 100 * guarded and clip > 10 * guarded
    run = result.runs["safestep"]
    assert all(t * s <= r * (1 + 1e-6) for t, r, s in zip(run["tau"], run["rho"], run["scale"]))
    measured = [r for r in result.runs["plain"]["rho"] if not math.isnan(r)]
    assert len(measured) == result.config.steps // result.config.monitor_every  # plain is monitored, not guarded


def test_table_files_and_report(demo):
    result, paths, _ = demo
    table = format_lm_table(result)
    assert [line.split()[0] for line in table.splitlines()[2:]] == ["plain", "clip", "safestep"]
    assert format_lm_table(result, markdown=True).count("\n") == 4
    assert {p.name for p in paths.values()} == {"results.json", "demo_lm.png", "report.md"}
    payload = json.loads(paths["results.json"].read_text())
    assert [r["method"] for r in payload["runs"]] == ["plain", "clip", "safestep"]
    assert payload["probe"] == {"bound": "ghost", "probe_size": 0.125, "method": "auto"}  # SafeStep's defaults
    report = paths["report.md"].read_text()
    assert "`SafeStep(AdamW, model)` with the library's defaults" in report and "| plain |" in report
    assert paths["demo_lm.png"].stat().st_size > 10_000


def test_the_demo_parser_has_an_lm_flag():
    args = build_parser().parse_args(["demo", "--lm", "--quick"])
    assert args.lm and args.quick
    assert not build_parser().parse_args(["demo"]).lm


@pytest.mark.slow
def test_cli_demo_lm_end_to_end(tmp_path, capsys):
    previous = torch.get_num_threads()
    try:
        assert main(["demo", "--lm", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(previous)
    printed = capsys.readouterr().out
    assert "safestep" in printed and "demo_lm.png" in printed
    assert (tmp_path / "report.md").exists()


def test_the_lm_demo_guards_with_safesteps_own_defaults():
    import inspect

    from safestep import SafeStep
    from safestep_lab.demo_lm import PROBE

    defaults = {k: v.default for k, v in inspect.signature(SafeStep.__init__).parameters.items()}
    assert PROBE == {key: defaults[key] for key in ("bound", "probe_size", "method")}
