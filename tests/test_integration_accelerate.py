"""SafeStep in a plain Accelerate loop (CPU, a tiny GPT-2 from a config): wrapped before ``accelerator.prepare``,
with gradient accumulation, a prepared scheduler, bf16 autocast, the reports reached through the
AcceleratedOptimizer and logged with ``accelerator.log``."""
import warnings

import pytest
import torch

accelerate = pytest.importorskip("accelerate")
pytest.importorskip("transformers")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.tracking import GeneralTracker  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from safestep import SafeStep  # noqa: E402
from safestep.integrations import report_metrics, seat_safestep, unwrap_safestep  # noqa: E402
from safestep.integrations.transformers import causal_lm_labels, hf_logits_fn  # noqa: E402
from safestep.telemetry import CallbackSink  # noqa: E402

VOCAB, SEQ, BATCH, MICRO_BATCHES, ACCUMULATE, LR = 50, 12, 4, 8, 2, 0.05


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps process-wide singletons (mixed precision, accumulation): start and leave them empty."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(token_id|loss_type).*")
        yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


class RecordingTracker(GeneralTracker):
    """An accelerate tracker that keeps what ``accelerator.log`` sends it."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self):
        super().__init__()
        self.logged = []

    @property
    def tracker(self):
        return self

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, dict(values)))


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                      bos_token_id=0, eos_token_id=0))


def _loader():
    """Dict batches of token ids; labels are the ids with -100 after a random length (padding)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH * MICRO_BATCHES, SEQ), generator=generator)
    lengths = torch.randint(SEQ // 2, SEQ + 1, (len(ids), 1), generator=generator)
    labels = ids.masked_fill(torch.arange(SEQ) >= lengths, -100)
    rows = [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]
    return torch.utils.data.DataLoader(rows, batch_size=BATCH)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_wrapped_before_prepare_the_guard_steps_once_per_accumulated_step(precision):
    tracker = RecordingTracker()
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE, mixed_precision=precision,
                              log_with=[tracker])
    accelerator.init_trackers("safestep")
    model = _gpt2()
    guard = SafeStep(torch.optim.AdamW(model.parameters(), lr=LR), model, logits_fn=hf_logits_fn,
                     labels_fn=causal_lm_labels)
    schedule = torch.optim.lr_scheduler.LambdaLR(guard, lambda step: 1.0 / (1 + step))
    model, optimizer, loader, schedule = accelerator.prepare(model, guard, _loader(), schedule)
    assert type(optimizer).__name__ == "AcceleratedOptimizer" and unwrap_safestep(optimizer) is guard
    unwrap_safestep(optimizer).history.add_sink(CallbackSink(accelerator.log))

    positions, moved, synced = [_flat(model)], [], []
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        synced.append(accelerator.sync_gradients)
        positions.append(_flat(model))
        moved.append((positions[-1] - positions[-2]).norm().item())

    steps = MICRO_BATCHES // ACCUMULATE
    assert synced == [False, True] * steps
    # one report per optimizer step, none for the micro-batches in between, each a measured, non-zero update
    reports = list(guard.history)
    assert [r.step for r in reports] == list(range(steps)) and guard.steps == steps
    assert all(r.tau > 0 and r.method == "jvp" and not r.skipped and r.reason != "zero update" for r in reports)
    assert [m for m, sync in zip(moved, synced) if not sync] == [0.0] * steps  # nothing moves between steps
    for report, applied in zip(reports, [m for m, sync in zip(moved, synced) if sync], strict=True):
        assert report.scale * report.tau == pytest.approx(applied, rel=1e-4)
    # the prepared scheduler stepped the guard's learning rate once per optimizer step
    assert guard.param_groups[0]["lr"] == pytest.approx(LR / (1 + steps))
    # the supported way to the reports through the AcceleratedOptimizer, and what accelerator.log received
    assert unwrap_safestep(optimizer).last_report is reports[-1]
    assert tracker.logged == [(r.step, report_metrics(r)) for r in reports]


def test_wrapping_after_prepare_is_refused():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = _gpt2()
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=LR))
    with pytest.raises(ValueError, match="before accelerator.prepare"):
        SafeStep(optimizer, model, logits_fn=hf_logits_fn)


def test_seated_after_prepare_the_guard_runs_inside_the_accumulation_gate():
    """seat_safestep (the FSDP2 path, where the guard must see the prepared model) keeps accelerate's gate."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATE)
    model = _gpt2()
    inner = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer, loader = accelerator.prepare(model, inner, _loader())
    guard = seat_safestep(optimizer, model, logits_fn=hf_logits_fn, labels_fn=causal_lm_labels)
    assert unwrap_safestep(optimizer) is guard and guard.optimizer is inner and optimizer.param_groups is inner.param_groups
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            optimizer.step()
            optimizer.zero_grad()
    assert [r.step for r in guard.history] == list(range(MICRO_BATCHES // ACCUMULATE))
    assert all(r.tau > 0 and not r.skipped for r in guard.history)
    with pytest.raises(ValueError, match="already holds a SafeStep"):
        seat_safestep(optimizer, model)
    with pytest.raises(ValueError, match="AcceleratedOptimizer that accelerator.prepare returned"):
        seat_safestep(inner, model)
