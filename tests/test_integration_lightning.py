"""SafeStep inside a real Lightning Trainer (CPU): closure-driven steps, AMP, gradient accumulation, schedulers, a
module without forward, batch feeding, logging and the progress bar, checkpoints."""
import csv
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from safestep import SafeStep  # noqa: E402
from safestep.integrations import unwrap_safestep  # noqa: E402
from safestep.integrations.lightning import PROGRESS_BAR_KEYS, SafeStepCallback, default_batch_to_inputs  # noqa: E402

BATCH = 32
SPIKE_AT = 6
SPIKE_FACTOR = 1e4


@pytest.fixture(autouse=True)
def _quiet_lightning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec|litlogger|GPU available).*")
        yield


def _blobs(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return 3.0 * torch.eye(3, 8)[y] + torch.randn(n, 8, generator=g), y


DATA = _blobs()


def _loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*DATA), batch_size=BATCH, shuffle=False)


class Classifier(pl.LightningModule):
    """An MLP classifier; ``call_self`` decides whether training_step goes through the guarded module's __call__."""

    def __init__(self, guard=True, call_self=True, spike=False, momentum=0.9, lr=0.05, **guard_kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        self.guard, self.call_self, self.spike = guard, call_self, spike
        self.momentum, self.lr, self.guard_kwargs = momentum, lr, guard_kwargs

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x) if self.call_self else self.net(x)
        loss = F.cross_entropy(logits.float(), y)
        self.log("train_loss", loss, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        if self.guard:
            optimizer = SafeStep(optimizer, self, **self.guard_kwargs)
        if not self.spike:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: SPIKE_FACTOR if s >= SPIKE_AT else 1.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _flat(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).double()


class UpdateRecorder(pl.Callback):
    """Independent record of every optimizer step: the applied update ‖θ_after − θ_before‖, θ0, the unscaled
    (accumulated) gradient norm, the learning rate and the step kwargs; and of the movement in micro-batches that
    did not step (``idle``)."""

    def __init__(self):
        self.before, self.applied, self.idle, self.grad_norms, self.step_kwargs, self.batches = None, [], [], [], [], []
        self.theta0, self.lrs = [], []

    def on_train_start(self, trainer, pl_module):
        unwrap_safestep(trainer.optimizers[0]).register_step_post_hook(
            lambda opt, args, kwargs: self.step_kwargs.append(kwargs))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = _flat(pl_module)
        self.batches.append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.theta0.append(_flat(pl_module))
        self.grad_norms.append(torch.cat([p.grad.reshape(-1) for p in pl_module.parameters()]).double().norm().item())
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        moved = (_flat(pl_module) - self.before).norm().item()
        (self.applied if len(self.applied) < len(self.theta0) else self.idle).append(moved)


def _trainer(max_steps, callbacks=(), logger=False, **kwargs):
    return pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                      callbacks=list(callbacks), **kwargs)


def _full_loss(module):
    with torch.no_grad():
        return F.cross_entropy(module.net(DATA[0]), DATA[1]).item()


def _csv_rows(logger):
    with open(f"{logger.log_dir}/metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("safestep/tau")]


def test_lr_spike_guarded_run_survives_plain_run_does_not(tmp_path):
    steps = 16
    plain = Classifier(guard=False, spike=True)
    _trainer(steps).fit(plain, _loader())
    guarded, recorder = Classifier(spike=True), UpdateRecorder()
    logger = CSVLogger(tmp_path, name="guarded")
    trainer = _trainer(steps, [SafeStepCallback(), recorder], logger=logger)
    trainer.fit(guarded, _loader())

    start = _full_loss(Classifier(guard=False))
    plain_loss, guarded_loss = _full_loss(plain), _full_loss(guarded)
    assert not (math.isfinite(plain_loss) and plain_loss < 10 * start), plain_loss
    assert math.isfinite(guarded_loss) and guarded_loss < 0.5 * start, (start, guarded_loss)

    rows = _csv_rows(logger)
    assert len(rows) == steps
    assert {f"safestep/{key}" for key in ("tau", "rho", "r_proposed", "scale", "r_applied", "capped", "skipped")} <= rows[0].keys()
    assert {key for key in trainer.progress_bar_metrics if key.startswith("safestep/")} == {
        "safestep/" + key for key in PROGRESS_BAR_KEYS}  # the bar shows two numbers, the logger gets all seven
    r_applied = [float(row["safestep/r_applied"]) for row in rows]
    assert max(r_applied) <= 1.0 + 1e-6
    assert sum(float(row["safestep/capped"]) for row in rows) == steps - SPIKE_AT
    # the logged s·τ is the update that really moved the parameters (measured independently)
    for row, moved in zip(rows, recorder.applied):
        assert float(row["safestep/scale"]) * float(row["safestep/tau"]) == pytest.approx(moved, rel=1e-4)
        assert float(row["safestep/r_proposed"]) == pytest.approx(float(row["safestep/tau"]) / float(row["safestep/rho"]),
                                                          rel=1e-5)
    assert {"safestep/tau", "safestep/rho", "safestep/r_proposed", "safestep/scale"} <= trainer.callback_metrics.keys()
    assert unwrap_safestep(trainer.optimizers[0]).last_report.method == "jvp"


def test_callback_feeds_the_batch_when_training_step_bypasses_the_guarded_module():
    with pytest.raises(ValueError, match="no batch to probe"):
        _trainer(2).fit(Classifier(call_self=False), _loader())
    histories = []
    for call_self in (True, False):
        trainer = _trainer(3, [SafeStepCallback()])
        trainer.fit(Classifier(call_self=call_self, probe_size=None), _loader())  # rows chosen alike either way
        histories.append([(r.rho, r.method, r.rows_probed) for r in unwrap_safestep(trainer.optimizers[0]).history])
    hooked, fed = histories
    assert len(fed) == 3 and fed == hooked  # the fallback probes exactly what the forward hook captures


class WithoutForward(pl.LightningModule):
    """No forward(): training_step calls ``self.net``; the guard gets ``self.net``, or ``self`` with a logits_fn."""

    LR, DECAY = 0.5, 0.5

    def __init__(self, guarded):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        self.guarded = guarded

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x).float(), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.LR)
        if self.guarded == "net":
            guard = SafeStep(optimizer, self.net, probe_size=None)
        else:
            guard = SafeStep(optimizer, self, logits_fn=lambda module, x: module.net(x), probe_size=None)
        schedule = torch.optim.lr_scheduler.LambdaLR(guard, lambda step: self.DECAY**step)
        return {"optimizer": guard, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_module_without_forward_with_accumulation_bf16_and_a_scheduler():
    steps, accumulate, histories = 3, 2, []
    for guarded in ("net", "self + logits_fn"):
        recorder = UpdateRecorder()
        trainer = _trainer(steps, [SafeStepCallback(), recorder], accumulate_grad_batches=accumulate,
                           precision="bf16-mixed")
        trainer.fit(WithoutForward(guarded), _loader())
        guard = unwrap_safestep(trainer.optimizers[0])
        reports = list(guard.history)
        assert len(reports) == steps and len(recorder.idle) == steps * (accumulate - 1)  # one report per optimizer step
        assert recorder.idle == [0.0] * len(recorder.idle)  # micro-batches in between neither step nor move
        assert recorder.lrs == pytest.approx([WithoutForward.LR * WithoutForward.DECAY**k for k in range(steps)])
        for report, lr, grad_norm, moved in zip(reports, recorder.lrs, recorder.grad_norms, recorder.applied, strict=True):
            assert report.method == "jvp" and not report.skipped
            assert report.tau == pytest.approx(lr * grad_norm, rel=1e-5)  # the accumulated gradient at the scheduled LR
            assert report.scale * report.tau == pytest.approx(moved, rel=1e-4)
        assert {key for key in trainer.progress_bar_metrics if key.startswith("safestep/")} == {
            "safestep/r_applied", "safestep/capped"}
        histories.append([(r.tau, r.rho) for r in reports])
    hooked, fed = histories
    assert fed == hooked  # logits_fn on the fed batch probes what the hook on self.net captures


def _ghost_radius_by_finite_differences(theta0, theta1, x, h=1e-5):
    """π / max_n (max_k a_nk − min_k a_nk), a = dz/dt along v = (θ1 − θ0)/‖θ1 − θ0‖, central differences in float64."""
    net = Classifier(guard=False).net.double()
    v = (theta1 - theta0) / (theta1 - theta0).norm()

    def logits_at(t):
        torch.nn.utils.vector_to_parameters(theta0 + t * v, net.parameters())
        with torch.no_grad():
            return net(x.double())

    a = (logits_at(h) - logits_at(-h)) / (2 * h)
    return math.pi / (a.amax(-1) - a.amin(-1)).max().item()


def test_explicit_batch_functions_feed_inputs_and_labels_without_the_forward_hook():
    calls = []

    def to_inputs(batch):
        calls.append("inputs")
        return batch[0]

    def to_labels(batch):
        calls.append("labels")
        return batch[1]

    recorder = UpdateRecorder()
    model = Classifier(capture=False, momentum=0.0, lr=0.5, probe_size=None)  # every row: the radius is recomputable
    trainer = _trainer(2, [SafeStepCallback(to_inputs, to_labels), recorder])
    trainer.fit(model, _loader())

    assert calls == ["inputs", "labels"] * 2
    for kwargs, (x, y) in zip(recorder.step_kwargs, recorder.batches):
        assert kwargs["inputs"] is x and kwargs["labels"] is y
    last = unwrap_safestep(trainer.optimizers[0]).last_report
    assert last.rows_probed == BATCH
    expected = _ghost_radius_by_finite_differences(recorder.theta0[-1], _flat(model), recorder.batches[-1][0])
    assert last.rho == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed+GradScaler"])
def test_amp_paths_step_on_unscaled_gradients(precision):
    if precision == "bf16-mixed":
        amp = {"precision": "bf16-mixed"}
    else:  # Lightning maps precision="16-mixed" to bf16 on CPU; the fp16 scaler path needs the plugin spelled out
        amp = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    lr, recorder = 0.1, UpdateRecorder()
    trainer = _trainer(3, [SafeStepCallback(), recorder], **amp)
    trainer.fit(Classifier(call_self=False, momentum=0.0, lr=lr), _loader())
    guard = unwrap_safestep(trainer.optimizers[0])
    assert (getattr(trainer.precision_plugin, "scaler", None) is not None) == (precision != "bf16-mixed")
    assert len(guard.history) == 3
    for report, grad_norm, moved in zip(guard.history, recorder.grad_norms, recorder.applied):
        assert report.method == "jvp" and not report.skipped
        assert report.tau == pytest.approx(lr * grad_norm, rel=1e-5)  # a scaled gradient would be 2^16 times longer
        assert report.scale * report.tau == pytest.approx(moved, rel=1e-4)


def test_checkpoint_round_trip_keeps_guard_counters_and_inner_state(tmp_path):
    first = _trainer(3, [SafeStepCallback()])
    first.fit(Classifier(), _loader())
    path = tmp_path / "guarded.ckpt"
    first.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["optimizer_states"][0]
    assert saved["param_groups"][0]["safestep_steps"] == 3
    assert all("momentum_buffer" in s for s in saved["state"].values())

    resumed = _trainer(5, [SafeStepCallback()])
    resumed.fit(Classifier(), _loader(), ckpt_path=path)
    guard = unwrap_safestep(resumed.optimizers[0])
    assert guard.steps == 5
    assert [r.step for r in guard.history] == [3, 4]


def test_unwrap_finds_safestep_inside_lightning_optimizer():
    module = Classifier()
    guard = module.configure_optimizers()
    wrapped = LightningOptimizer(guard)
    assert isinstance(wrapped, SafeStep)  # Lightning fakes the class; unwrap must still return the real guard
    assert unwrap_safestep(wrapped) is guard
    # LightningOptimizer.optimizer (the guard) shadows SafeStep.optimizer (the inner one); the properties still resolve
    assert wrapped.param_groups is guard.optimizer.param_groups and wrapped.state is guard.optimizer.state
    assert unwrap_safestep(torch.optim.SGD(module.parameters(), lr=0.1)) is None


def test_callback_without_a_guard_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="no SafeStep optimizer"):
        _trainer(1, [SafeStepCallback()]).fit(Classifier(guard=False), _loader())
    with pytest.raises(ValueError, match="batch_to_inputs must be callable"):
        SafeStepCallback(batch_to_inputs="x")
    with pytest.raises(ValueError, match="batch_to_inputs"):
        default_batch_to_inputs({"x": torch.zeros(2)})
    x = torch.zeros(2, 3)
    assert default_batch_to_inputs(x) is x and default_batch_to_inputs((x, 0)) is x


def test_importing_safestep_imports_no_framework():
    code = ("import sys, safestep, safestep.integrations, safestep.integrations.deepspeed, safestep.telemetry, "
            "safestep.cli; print(sorted({'lightning', 'transformers', 'accelerate', 'matplotlib', 'olmo_core', "
            "'deepspeed'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
