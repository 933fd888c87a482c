"""Evaluation helpers (BatchNorm recalibration, train-mode metrics) and the worker-process unit runner."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from safestep_lab.data import Split
from safestep_lab.evaluation import (
    accuracy_and_loss, has_batch_norm, recalibrate_batch_norm, recalibrated_metrics, train_mode_metrics,
)
from safestep_lab.models import CNNBatchNorm, Linear
from safestep_lab.parallel import run_units


@pytest.fixture(scope="module")
def split() -> Split:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(96, 64, generator=generator)
    return Split(x[:64], torch.randint(0, 10, (64,), generator=generator), x[64:],
                 torch.randint(0, 10, (32,), generator=generator), n_classes=10)


def test_accuracy_and_loss_count_non_finite_rows_as_wrong():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [float("nan"), 0.0]])
    accuracy, _ = accuracy_and_loss(logits[:2], torch.tensor([0, 0]))
    assert accuracy == 0.5
    assert accuracy_and_loss(logits, torch.tensor([0, 1, 0]))[0] == pytest.approx(2 / 3)


def test_recalibrated_metrics_use_the_training_population_and_leave_the_model_alone(split):
    torch.manual_seed(0)
    model = CNNBatchNorm(channels=4)
    model.features[1].running_mean.fill_(5.0)  # stale statistics, as after a large step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy, loss = recalibrated_metrics(model, split)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    twin = CNNBatchNorm(channels=4)
    twin.load_state_dict(before)
    norm = twin.features[1]
    recalibrate_batch_norm(twin, split.x_train)
    with torch.no_grad():
        conv = twin.features[0](split.x_train.unsqueeze(1))
    torch.testing.assert_close(norm.running_mean, conv.mean(dim=(0, 2)))  # population mean of the training split
    with torch.no_grad():
        logits = twin.eval()(split.x_test)
    assert (accuracy, loss) == pytest.approx(accuracy_and_loss(logits, split.y_test))
    assert has_batch_norm(model) and not has_batch_norm(Linear())


def test_train_mode_metrics_normalise_the_test_batch_by_itself(split):
    torch.manual_seed(1)
    model = CNNBatchNorm(channels=4)
    before = model.features[1].running_mean.clone()
    accuracy, test_loss, train_loss = train_mode_metrics(model, split)
    assert torch.equal(model.features[1].running_mean, before)
    with torch.no_grad():
        model.train()
        expected = accuracy_and_loss(model(split.x_test), split.y_test)
        expected_train = float(F.cross_entropy(model(split.x_train), split.y_train))
    assert (accuracy, test_loss, train_loss) == pytest.approx((*expected, expected_train))


def test_run_units_keeps_order_reports_cost_and_resumes_from_its_cache(tmp_path):
    calls = []
    units = [(1, 2), (3, 4), (5, 6)]
    results = run_units(operator.add, units, progress=lambda d, t, label: calls.append((d, t)),
                        cost=lambda u: u[0], first=lambda u: u == (1, 2), cache=tmp_path)
    assert results == [3, 7, 11]
    assert calls == [(1, 9), (6, 9), (9, 9)]  # the flagged unit first, then the most expensive
    assert len(list(tmp_path.glob("*.pickle"))) == 3
    assert run_units(operator.mul, units, cache=tmp_path) == [2, 12, 30]  # another function: its own cache entries
    assert run_units(operator.add, units, cache=tmp_path) == [3, 7, 11]
    with pytest.raises(ValueError, match="workers"):
        run_units(operator.add, units, workers=0)


def test_run_units_in_two_worker_processes():
    assert run_units(operator.add, [(i, i) for i in range(4)], workers=2) == [0, 2, 4, 6]
