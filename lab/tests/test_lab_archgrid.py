"""archgrid (Fig. 10 / Table 1): the unshuffled split, a one-architecture grid in CI time, and the quick run (slow)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from safestep_lab.experiments import REGISTRY, RunOptions, load
from safestep_lab.experiments.archgrid import (
    GRAD_PROXY, METHODS, QUICK, GridConfig, result_from_runs, run_grid, unshuffled_digits_split,
)
from safestep_lab.report import write_result


def test_unshuffled_split_takes_the_first_359_rows_as_test_set():
    from sklearn.datasets import load_digits

    raw = load_digits()
    split = unshuffled_digits_split()
    np.testing.assert_array_equal(split.x_test.numpy(), (raw.data[:359] / 16.0).astype(np.float32))
    np.testing.assert_array_equal(split.y_train.numpy(), raw.target[359:])
    assert split.x_train.shape == (1438, 64) and split.n_classes == 10
    assert unshuffled_digits_split(240).x_train.shape == (240, 64)
    with pytest.raises(ValueError, match="train_rows"):
        unshuffled_digits_split(0)


def test_config_rejects_unknown_names_and_bad_spike_step():
    with pytest.raises(ValueError, match="unknown"):
        GridConfig(architectures=("ResNet",), methods=("plain",), spikes=(10.0,), seeds=1)
    with pytest.raises(ValueError, match="spike_step"):
        GridConfig(architectures=("MLP+LN",), methods=("plain",), spikes=(10.0,), seeds=1, steps=10, spike_step=10)


SMALL = GridConfig(architectures=("MLP+LN",), methods=tuple(METHODS), spikes=(1e4,), seeds=1, steps=40,
                   spike_step=20, train_rows=240)


@pytest.fixture(scope="module")
def small_grid():
    runs = run_grid(SMALL, [0])
    return {r["method"]: r for r in runs if r["spike"] == 1e4}, result_from_runs(runs, SMALL, 0.0, quick=True)


def test_mlp_ln_x10000_spike_breaks_plain_clip_and_agc_but_not_safestep(small_grid):
    runs, _ = small_grid
    pre = runs["plain"]["pre_spike_accuracy"]
    assert pre > 0.7  # identical inits and steps before the spike: every method starts from a trained model
    for method in ("plain", "clip", "AGC"):  # measured: final train loss in the hundreds to thousands
        assert runs[method]["diverged"] and runs[method]["final_loss"] > 10
        assert runs[method]["final_accuracy"] < pre - 0.2
    safe = runs["SafeStep"]
    assert not safe["diverged"] and safe["final_loss"] < 1.0 and safe["final_accuracy"] > pre - 0.1
    assert safe["peak_post_spike_loss"] < 1.0  # measured ≈ 0.002 (plain ≈ 5e4)
    # the gradient-direction proxy under-measures Adam's step: here (240 rows, 20 steps) its loss still spikes
    # (measured peak ≈ 9), but orders of magnitude less than plain Adam's
    assert runs[GRAD_PROXY]["peak_post_spike_loss"] < runs["plain"]["peak_post_spike_loss"] / 100


def test_every_method_starts_from_the_same_initialisation(small_grid):
    runs, _ = small_grid
    assert len({r["loss"][0] for r in runs.values()}) == 1  # torch.manual_seed(seed) before each model
    assert runs["AGC"]["loss"][1] != runs["plain"]["loss"][1]  # AGC clips the very first gradient


def test_result_has_table1_claims_and_figures(small_grid, tmp_path):
    _, result = small_grid
    claim = next(c for c in result.claims if c.claim.startswith("Table 1, MLP+LN"))
    assert claim.paper.startswith("plain 44.6, clip 51.5")
    assert "SafeStep" in claim.ours and "div 1/1" in claim.ours
    paths = write_result(result, tmp_path)
    assert {"archgrid_accuracy.png", "archgrid_loss.png", "results.json", "report.md"} <= set(paths)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert len(payload["metrics"]["runs"]) == len(METHODS) + 1  # + the plain run without a spike
    assert "archgrid" in REGISTRY


def test_the_no_spike_reference_learns_and_the_spike_claims_compare_with_it(small_grid):
    runs, result = small_grid
    reference = result.metrics["summary"]["MLP+LN/plain/x1"]
    assert reference["diverged"] == 0 and reference["final_accuracy_median"] > runs["plain"]["pre_spike_accuracy"]
    claim = next(c for c in result.claims if c.claim.startswith("Table 1, MLP+LN"))
    # measured: the controller keeps ≥ 60 % after ×10000 while plain Adam falls to chance
    assert claim.verdict == "holds" and f"no spike {100 * reference['final_accuracy_median']:.1f}" in claim.ours


@pytest.mark.parametrize("arch", ["MLP+LN", "CNN+BN"])
def test_guard_radius_matches_an_independent_finite_difference_radius(arch):
    """ρ_a SafeStep measures along Adam's first full-batch step = π/max spread of float64 FD slopes (train mode)."""
    import torch

    from _lab_reference import fd_radius, first_adam_direction
    from safestep_lab.experiments.archgrid import ARCHITECTURES, run_one

    config = GridConfig(architectures=(arch,), methods=("SafeStep",), spikes=(1.0,), seeds=1, steps=2, spike_step=1,
                        train_rows=240)
    run = run_one(arch, "SafeStep", 1.0, 0, config)
    data = unshuffled_digits_split(240)
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]()
    direction = first_adam_direction(model, data.x_train, data.y_train)
    assert run["rho_first_step"] == pytest.approx(fd_radius(model, direction, data.x_train, train_mode=True),
                                                  rel=1e-3)


def test_mlp_ln_is_three_layernorm_blocks_of_width_64():
    from torch import nn

    from safestep_lab.experiments.archgrid import ARCHITECTURES

    layers = list(ARCHITECTURES["MLP+LN"]().net)
    assert [type(m) for m in layers] == [nn.Linear, nn.LayerNorm, nn.GELU] * 3 + [nn.Linear]
    assert [m.out_features for m in layers if isinstance(m, nn.Linear)] == [64, 64, 64, 10]


@pytest.mark.slow
def test_quick_run_safestep_survives_x10000_on_every_architecture_while_plain_diverges():
    result = load("archgrid").run(RunOptions(quick=True))
    runs = {(r["arch"], r["method"]): r for r in result.metrics["runs"] if r["spike"] == 1e4}
    assert len(runs) == len(QUICK.architectures) * len(QUICK.methods)
    assert len(result.metrics["runs"]) == len(runs) + len(QUICK.architectures)  # + one no-spike run each
    for arch in QUICK.architectures:
        assert runs[(arch, "plain")]["diverged"]
        assert not runs[(arch, "SafeStep")]["diverged"]
        # CNN+BN barely learns in the quick variant's 20 pre-spike steps, so compare losses, not accuracies
        assert runs[(arch, "SafeStep")]["final_loss"] < runs[(arch, "plain")]["final_loss"] / 100
