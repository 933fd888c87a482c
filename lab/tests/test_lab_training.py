"""The lab's one training loop, run_steps: what a stepper sees, what records hold, the end on a non-finite loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from safestep.telemetry import StepReport
from safestep_lab.training import Batch, StepRecord, run_steps


def _report(step: int) -> StepReport:
    return StepReport(tau=1.0, rho=2.0, r_proposed=0.5, scale=1.0, r_applied=0.5, bound="ghost", method="jvp",
                      rows_probed=4, skipped=False, seconds=0.0, step=step)


def _problem() -> tuple[torch.nn.Linear, torch.optim.SGD, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    return model, torch.optim.SGD(model.parameters(), lr=1.0), torch.randn(6, 3), torch.randint(0, 4, (6,))


def test_the_stepper_sees_the_batch_after_backward_and_the_records_hold_its_reports():
    model, optimizer, x, y = _problem()
    seen: list[Batch] = []
    after: list[int] = []

    def stepper(batch: Batch) -> StepReport | None:
        seen.append(batch)
        assert all(p.grad is not None for p in model.parameters())  # called after the backward
        optimizer.step()
        return _report(batch.step) if batch.step % 2 == 0 else None

    records = run_steps(model, optimizer, stepper, lambda step: (x[step:step + 2], y[step:step + 2]), 3,
                        lr_schedule=lambda step: 0.1 * (step + 1), after_step=lambda record: after.append(record.step))
    assert [b.step for b in seen] == [0, 1, 2] and after == [0, 1, 2]
    assert all(torch.equal(b.inputs, x[b.step:b.step + 2]) and b.logits.shape == (2, 4) for b in seen)
    assert seen[0].loss.item() == records[0].loss == F.cross_entropy(seen[0].logits, y[0:2]).item()
    assert [r.lr for r in records] == [0.1, 0.2, 0.1 * 3] and optimizer.param_groups[0]["lr"] == 0.1 * 3
    assert [r.report is not None for r in records] == [True, False, True] and records[2].report.step == 2
    assert [r.rho for r in records] == [2.0, None, 2.0]


def test_a_non_finite_loss_is_recorded_and_ends_the_run_before_its_backward():
    model, optimizer, x, y = _problem()
    stepped: list[int] = []
    after: list[StepRecord] = []

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels)
        return loss * math.inf if len(stepped) == 2 else loss

    def stepper(batch: Batch) -> None:
        stepped.append(batch.step)
        optimizer.step()

    records = run_steps(model, optimizer, stepper, lambda step: (x, y), 10, loss_fn=loss_fn, after_step=after.append)
    assert len(records) == 3 and math.isinf(records[-1].loss) and records[-1].report is None
    assert stepped == [0, 1] and [r.step for r in after] == [0, 1]
