"""The bottlenecks experiment: set-mode steps of length ρ, the phase table, and the quick run's claims."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from safestep import SafeStep
from safestep_lab.experiments import RunOptions
from safestep_lab.experiments.bottlenecks import EXPERIMENT, QUICK, RunLog, _digits, _step, phase_table
from safestep_lab.internal_radii import TinyTransformer
from safestep_lab.report import write_result


@pytest.fixture(scope="module")
def small_batch():
    data = _digits(48)
    return data.x_train, data.y_train


def _model_and_optimizer(seed: int = 0) -> tuple[TinyTransformer, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = TinyTransformer()
    return model, torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def test_min_mode_step_is_adamw_direction_with_length_min_radius(small_batch):
    x, y = small_batch
    model, optimizer = _model_and_optimizer()
    model.train()
    for _ in range(2):  # warm the Adam moments
        _step(model, optimizer, x, y, "fixed-1x", False, 0.01)
    plain_model, plain_optimizer = copy.deepcopy((model, optimizer))  # one memo: the copies share parameters
    assert plain_optimizer.param_groups[0]["params"][0] is next(plain_model.parameters())
    theta0 = _flat(model)
    loss, radii, length = _step(model, optimizer, x, y, "min", False, 0.01)
    torch.nn.functional.cross_entropy(plain_model(x), y).backward()
    plain_optimizer.step()
    applied, proposed = _flat(model) - theta0, _flat(plain_model) - theta0
    assert math.isfinite(loss)
    # the core's guarded write: never longer than ρ, shortened by at most its rounding allowance (0.1 %)
    assert radii.smallest * (1 - 1e-3) <= float(applied.norm()) <= radii.smallest and length == radii.smallest
    assert float(torch.nn.functional.cosine_similarity(applied, proposed, dim=0)) > 1 - 1e-6


def test_out_mode_step_equals_safestep_set_mode_with_the_ghost_bound(small_batch):
    x, y = small_batch
    model, optimizer = _model_and_optimizer(seed=1)
    twin, twin_inner = _model_and_optimizer(seed=1)
    guard = SafeStep(twin_inner, twin, r=1.0, mode="set", bound="ghost", method="jvp", probe_size=None)
    _step(model, optimizer, x, y, "out", False, 0.01)
    loss = torch.nn.functional.cross_entropy(twin(x), y)
    guard.zero_grad()
    loss.backward()
    guard.step(inputs=x)
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=1e-5, atol=1e-7)


def test_radii_of_a_step_match_independent_finite_differences(small_batch):
    """ρ_out and ρ_attn along AdamW's first step = π / max spread of float64 FD slopes of logits / attention scores,
    and an "out" step has exactly length ρ_out."""
    from _lab_reference import fd_radius

    x, y = small_batch
    model, optimizer = _model_and_optimizer(seed=2)
    before = copy.deepcopy(model)
    twin, twin_optimizer = copy.deepcopy((model, optimizer))
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    twin_optimizer.step()
    delta = {n: p.detach() - q.detach() for (n, p), q in zip(twin.named_parameters(), before.parameters())}
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in delta.values()))
    direction = {n: d / norm for n, d in delta.items()}
    _, radii, length = _step(model, optimizer, x, y, "out", False, 0.01)
    assert radii.out == pytest.approx(fd_radius(before, direction, x), rel=1e-4) and length == radii.out
    assert float((_flat(model) - _flat(before)).norm()) == pytest.approx(radii.out, rel=1e-5)

    class Scores(torch.nn.Module):  # the attention scores (one softmax row per layer, sample, head, query)
        def __init__(self, inner: TinyTransformer) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            scores = self.inner(inputs, internals=True)[1]
            return scores.reshape(-1, scores.shape[-1])

    prefixed = {f"inner.{n}": d for n, d in direction.items()}
    assert radii.attn == pytest.approx(fd_radius(Scores(before), prefixed, x), rel=1e-4)


def test_phase_table_counts_and_medians_by_hand():
    log = RunLog("min", 0, steps=list(range(7)),
                 binding=["ffn", "ffn", "out", "ffn", "out", "out", "out"],
                 radii=[{"out": o, "attn": 1.0, "ffn": f} for o, f in
                        [(3, 1), (4, 2), (1, 5), (2, 1), (1, 3), (1, 4), (2, 9)]])
    table = phase_table([log])  # thirds of 7 points: 2 / 2 / 3
    assert table["early"]["counts"] == {"out": 0, "attn": 0, "ffn": 2} and table["early"]["total"] == 2
    assert table["middle"]["counts"] == {"out": 1, "attn": 0, "ffn": 1}
    assert table["late"]["counts"] == {"out": 3, "attn": 0, "ffn": 0} and table["late"]["total"] == 3
    assert table["early"]["median"]["out"] == 3.5 and table["late"]["median"]["ffn"] == 4


def test_quick_run_reports_the_measured_bottlenecks(tmp_path):
    result = EXPERIMENT.run(RunOptions(quick=True))
    paths = write_result(result, tmp_path)
    assert {"results.json", "report.md", "radii.png", "training.png"} <= set(paths)
    phases = result.metrics["phases"]
    # measured: the FFN kink proxy binds throughout a short run; the attention radius never binds
    assert phases["early"]["counts"]["ffn"] == phases["early"]["total"] > 0
    assert sum(phases[p]["counts"]["attn"] for p in phases) == 0
    for phase in phases.values():
        medians = phase["median"]
        assert medians["attn"] > 2 * medians["out"] > 2 * medians["ffn"]
    runs = result.metrics["runs"]
    assert len(runs) == len(QUICK.modes) and all(run["diverged_at"] is None for run in runs)
    controlled = next(run for run in runs if run["mode"] == "min")
    for length, radii in zip(controlled["step_length"], controlled["radii"]):
        assert length == min(radii.values())
    assert result.metrics["modes"]["min"]["median_final_accuracy"] > 0.3
