"""`safestep demo` end to end through `safestep.cli.main`, plus the CLI's version and error handling."""
from __future__ import annotations

import json
import math
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from safestep.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]  # the repository (lab/tests/ is two levels down)
OUTPUT_NAMES = ("results.json", "demo.png", "report.md")


def _outputs_in_repo() -> set[Path]:
    """Every file in the repository (virtualenv, git and caches excluded) named like a demo output."""
    import os

    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in {".venv", ".git", ".pytest_cache", "__pycache__"}]
        found.update(Path(root) / f for f in files if f in OUTPUT_NAMES)
    return found


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One quick demo run shared by the tests below (its stdout captured by hand)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "out"
    before = _outputs_in_repo()
    previous = torch.get_num_threads()  # the demo sets its own thread count; restore ours afterwards
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["demo", "--quick", "--no-progress", "--out", str(out)])
    finally:
        torch.set_num_threads(previous)
    return {"code": code, "out": out, "stdout": stdout.getvalue(), "new_in_repo": _outputs_in_repo() - before}


def test_demo_writes_its_outputs_and_nothing_into_the_source_tree(demo_run):
    assert demo_run["code"] == 0
    out = demo_run["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_NAMES)  # no leftover temp files
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert demo_run["new_in_repo"] == set()


def test_demo_results_json_holds_every_run_with_measured_ratios(demo_run):
    payload = json.loads((demo_run["out"] / "results.json").read_text())
    cfg = payload["config"]
    runs = {(r["model"], r["method"]): r for r in payload["runs"]}
    assert set(runs) == {(m, k) for m in ("mlp-ln", "transformer") for k in ("plain", "clip", "safestep")}
    spike = range(cfg["spike_start"], cfg["spike_stop"])
    for (model, method), run in runs.items():
        steps = run["steps"]
        assert len(steps) == cfg["steps"] or run["diverged"]
        assert [s["step"] for s in steps] == list(range(len(steps)))
        assert all(s["lr"] == pytest.approx(cfg["base_lr"] * (cfg["spike_factor"] if s["step"] in spike else 1)) for s in steps)
        measured = [s for s in steps if isinstance(s.get("r_proposed"), float)]
        assert len(measured) >= len(steps) - 1  # r measured on every step, monitored runs included
        assert all(s["r_applied"] == pytest.approx(s["r_proposed"] * s["scale"], rel=1e-6) for s in measured)
        spike_ratios = [s["r_proposed"] for s in measured if s["step"] in spike]
        # Adam at LR 10 proposes steps far longer than the radius: the measured r must show it
        assert spike_ratios and max(spike_ratios) > 1.0
        if method == "safestep":
            assert not run["diverged"]
            assert all(s["scale"] <= 1.0 + 1e-6 for s in steps)
            # cap at r = 1: an applied step is never longer than the radius, and a capped one is ρ less the
            # rounding margin the guard keeps so that the realized step stays within ρ (under 1e-3 in float32)
            assert all(s["r_applied"] <= 1.0 for s in steps if not s["skipped"])
            assert all(1.0 - 1e-3 <= s["r_applied"] for s in steps if s["scale"] < 1 and not s["skipped"])
            capped = sum(1 for s in steps if s["scale"] < 1.0 and not s["skipped"])
            assert capped == run["steps_capped"] and capped >= len(spike) // 2
        else:
            assert all(s["scale"] is None or s["scale"] == pytest.approx(1.0) for s in steps)
        assert 0.0 <= run["test_accuracy"] <= 1.0


def test_demo_table_and_report_show_the_measured_numbers(demo_run):
    payload = json.loads((demo_run["out"] / "results.json").read_text())
    report = (demo_run["out"] / "report.md").read_text()
    assert "![" in report and "demo.png" in report
    for run in payload["runs"]:
        accuracy = f"{run['test_accuracy']:.3f}"
        title = {"mlp-ln": "MLP+LayerNorm", "transformer": "RowTransformer"}[run["model"]]
        line = next(l for l in demo_run["stdout"].splitlines() if l.startswith(title) and f" {run['method']} " in l)
        assert accuracy in line
        assert f"| {title} | {run['method']} | {accuracy} |" in report
        assert math.isfinite(run["max_r"]) and f"{run['max_r']:.3g}" in line


def test_version_flag_prints_the_installed_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"safestep {version('safestep')}"


@pytest.mark.parametrize("argv", [["demo", "--bogus"], ["demo", "--steps", "0"], ["frobnicate"]])
def test_bad_arguments_exit_with_code_two(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_returns_two(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().err


def test_default_output_folder_is_relative_to_the_working_directory():
    args = build_parser().parse_args(["demo"])
    assert args.out == "safestep-demo" and args.steps == 400 and args.seed == 0 and not args.quick


def test_demo_config_scales_the_spike_window_and_rejects_bad_windows():
    from safestep_lab.demo import DemoConfig

    cfg = DemoConfig.for_steps(200)
    assert (cfg.spike_start, cfg.spike_stop, cfg.spike_factor) == (50, 100, 1e4)
    assert DemoConfig.for_steps(999, quick=True).steps == 40
    with pytest.raises(ValueError, match="spike window"):
        DemoConfig(steps=10, spike_start=5, spike_stop=20)
    with pytest.raises(ValueError, match="unknown methods"):
        DemoConfig(methods=("plain", "sgd"))
