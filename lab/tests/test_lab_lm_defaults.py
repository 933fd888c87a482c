"""`safestep reproduce lm-defaults --quick`: issue 19's protocol on a tiny run; each bar computed and its direction."""
from __future__ import annotations

import math

import pytest
from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments.lm_defaults import (
    BARS,
    FULL,
    QUICK,
    TRAP_REFERENCE,
    bars,
    choose_default,
    methods,
    phases,
    units,
)
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def quick():
    return load("lm-defaults").run(RunOptions(quick=True))


def _run(result, kind, lr, method, factor=1.0):
    return next(r for r in result.metrics["runs"] if r["kind"] == kind and r["lr_value"] == lr
                and r["method"] == method and r["factor"] == factor)


def test_protocol_covers_the_issue_and_runs_the_important_cells_first():
    assert "lm-defaults" in REGISTRY
    assert FULL.lrs == (1e-3, 3e-3, 1e-2, 3e-2) and len(FULL.seeds) == 5 and FULL.steps == 300
    assert set(FULL.spike_factors) == {10.0, 100.0, 1000.0} and FULL.lr_pairs == (1e-3, 3e-3)
    first = phases(FULL)[0]
    assert {u[0] for u in first} == {"trap", "calm"} and {u[1] for u in first} == set(FULL.ghost_lrs)
    assert len(units(FULL)) == len(set(units(FULL)))
    options = {name: dict(m.options) for name, m in methods().items()}
    assert options["ss-default"]["probe_size"] == 0.125 and options["ss-default"]["bound"] == "ghost"
    assert options["ss-weighted"]["probe_size"] is None and options["ss-weighted"]["bound"] == "weighted"
    assert all(o["r"] == 1.0 and o["mode"] == "cap" for n, o in options.items() if n.startswith("ss-"))


def test_every_unit_ran_and_guarded_steps_respect_the_radius(quick):
    assert len(quick.metrics["runs"]) == len(units(QUICK))
    for lr in QUICK.lrs:  # same initialisation for every method
        assert len({_run(quick, "calm", lr, m)["val_loss"][0] for m in QUICK.calm_at(lr)}) == 1
    trace = next(r for r in quick.metrics["runs"] if r["kind"] == "trap" and r["method"] == "ss-ghost")
    for tau, rho, scale in zip(trace["series"]["tau"], trace["series"]["rho"], trace["series"]["scale"]):
        assert tau * scale <= rho * (1 + 1e-3)


def test_trap_direction_weighted_radius_is_never_below_ghost(quick):
    """R_w >= π/Δ_a row by row, so on the same update the whole-batch R_w caps less than the ghost bound."""
    for trace in (r for r in quick.metrics["runs"] if r["kind"] == "trap"):
        assert trace["rows"]
        for row in trace["rows"]:
            assert row["weighted"]["rho"] >= row["ghost"]["rho"] * (1 - 1e-6)
            assert row["ghost"]["weighted_rho_of_row"] >= row["ghost"]["rho"] * (1 - 1e-6)
            assert 0 < row["ghost"]["p_label"] <= 1 and row["ghost"]["spread"] > 0
            # the binding row's ghost radius is π/Δ_a of the slopes the trace read itself (a radius ×3 goes red)
            assert row["ghost"]["rho"] == pytest.approx(math.pi / row["ghost"]["spread"], rel=2e-3)
    summary = quick.metrics["summary"]["trap"]
    assert set(summary) == set(QUICK.trap_methods + TRAP_REFERENCE)


def test_spike_direction_guard_rescues_what_plain_adamw_does_not(quick):
    """×1000 held: plain AdamW ends far above its calm run, the guarded run near its own (12 steps are too short for
    the 5 % bar itself: early in training ρ is long, so the capped spiked steps are still long)."""
    for lr in QUICK.lr_pairs:
        plain = _run(quick, "spike", lr, "plain", 1000.0)["final_val_loss"]
        plain_calm = _run(quick, "calm", lr, "plain")["final_val_loss"]
        guarded = _run(quick, "spike", lr, "ss-weighted", 1000.0)["final_val_loss"]
        calm = _run(quick, "calm", lr, "ss-weighted")["final_val_loss"]
        assert guarded < plain and guarded / calm - 1 < (plain / plain_calm - 1) / 5
    bar = quick.metrics["summary"]["bars"]["ss-weighted"]["spike"]
    assert bar["met"] == (bar["value"] <= BARS["spike"]) and math.isfinite(bar["value"])


def test_each_bar_is_computed_and_its_verdict_follows_its_number(quick):
    table = quick.metrics["summary"]["bars"]
    assert set(table) == {"ss-default", "ss-weighted", "ss-ghost"}
    for method, result in table.items():
        assert {"per_seed", "median", "trap", "spike", "flat", "cost"} <= set(result)
        if result["per_seed"]["met"] is not None:
            assert result["per_seed"]["met"] == (result["per_seed"]["value"] <= BARS["per_seed"])
            assert result["median"]["met"] == (result["median"]["value"] <= 0.0)
        assert result["trap"]["met"] == (result["trap"]["value"] < BARS["trap_steps"])
        assert result["cost"]["met"] is None and (method == "ss-ghost" or result["cost"]["value"] > 0)
    flat = table["ss-weighted"]["flat"]
    assert flat["met"] is not None and flat["value"] >= 1.0
    # worse than plain on a seed by more than 3 % is a miss: a synthetic cell decides it
    cells = {"calm/0.01/x1/plain": {"kind": "calm", "lr": 1e-2, "factor": 1.0, "method": "plain",
                                    "per_seed": {0: 2.0}, "median": 2.0, "seconds_median": 1.0},
             "calm/0.01/x1/ss-weighted": {"kind": "calm", "lr": 1e-2, "factor": 1.0, "method": "ss-weighted",
                                          "per_seed": {0: 2.1}, "median": 2.1, "seconds_median": 2.0,
                                          "steps_scale_below_0.1": {0: 60}, "longest_scale_below_0.1": {0: 60}}}
    synthetic = bars(cells, QUICK, initial=5.0)["ss-weighted"]
    assert synthetic["per_seed"]["met"] is False and synthetic["per_seed"]["value"] == pytest.approx(0.05)
    assert synthetic["trap"]["met"] is False and synthetic["median"]["met"] is False


def test_report_files_and_tables(quick, tmp_path):
    paths = write_result(quick, tmp_path, quick=True)
    assert set(paths) == {"lm_defaults.png", "results.json", "report.md"}
    tables = quick.metrics["summary"]["tables"]
    assert "| LR | method | seed 0 |" in tables["calm"] and "| method | bar | verdict |" in tables["bars"]
    assert all(math.isfinite(r["seconds"]) for r in quick.metrics["runs"])


def _bar(met, value=0.0):
    return {"met": met, "value": value, "detail": ""}


def test_the_rule_puts_safety_first_then_harm_then_the_worst_seed():
    def table(spike, trap, per_seed, median=True, flat=True, worst=0.1):
        return {"spike": _bar(spike, 0.01), "trap": _bar(trap, 10), "per_seed": _bar(per_seed, worst),
                "median": _bar(median, 0.01), "flat": _bar(flat, 1.2), "cost": {"met": None, "value": 2.0}}

    calm_but_unsafe = table(False, True, True, worst=0.0)
    safe_but_harmful = table(True, True, False, median=False, worst=0.15)
    assert choose_default({"ss-a": calm_but_unsafe, "ss-b": safe_but_harmful})[0] == "ss-b"
    less_harm = table(True, True, False, worst=0.2)
    assert choose_default({"ss-b": safe_but_harmful, "ss-c": less_harm})[0] == "ss-c"
    tie = table(True, True, False, worst=0.05)
    assert choose_default({"ss-c": less_harm, "ss-d": tie})[0] == "ss-d"
    unrun = dict(tie, spike=_bar(None))
    assert choose_default({"ss-e": unrun, "plain": tie}) == ("", "no candidate has every bar run")


def test_the_committed_protocol_chose_the_library_default():
    """The shipped default is what the committed full run's rule picks, with the options SafeStep defaults to."""
    import inspect
    import json
    from pathlib import Path

    from safestep import SafeStep

    results = json.loads((Path(__file__).resolve().parents[1] / "results" / "lm-defaults" / "results.json").read_text())
    chosen, _ = choose_default(results["metrics"]["summary"]["bars"])
    defaults = {k: v.default for k, v in inspect.signature(SafeStep.__init__).parameters.items()}
    options = dict(methods()[chosen].options)
    for key in ("bound", "probe_size", "mode"):
        assert options[key] == defaults[key], key
    assert options["method"] == defaults["method"] == "auto" and defaults["probe_select"] == "mixed"
    assert defaults["r"] is None and options["r"] == 1.0  # r = None means 1 in cap mode


def test_bpe_cell_keeps_the_seeds_and_says_what_was_cut():
    """Issue 19 asks for the BPE GPT (V = 8192, d ≥ 128) with 5 seeds; cuts go to LRs, steps and cells, never seeds."""
    from safestep_lab.experiments.lm_defaults import BPE, experiment_name
    from safestep_lab.lm import GPT_PRESETS
    from safestep_lab.experiments.lm_defaults_bpe import EXPERIMENT

    assert EXPERIMENT.name == experiment_name(BPE) == "lm-defaults-bpe" and "lm-defaults-bpe" in REGISTRY
    assert BPE.seeds == FULL.seeds and BPE.setup.preset == "bpe" and set(BPE.lrs) >= set(BPE.lr_pairs)
    assert {"plain", "ss-default"} <= set(BPE.calm_methods) and set(BPE.spike_methods) <= set(BPE.calm_methods)
    assert any(u[0] == "spike" for u in units(BPE)) and not any(u[0] in ("cosine", "trap") for u in units(BPE))
    preset = GPT_PRESETS[BPE.setup.preset]
    assert BPE.setup.tokenizer == "bpe" and preset.vocab_size == 8192 and preset.d_model >= 128
