"""SafeStep on the inputs real users feed it: ignored labels, masked classes, dict batches, copies, sparse and
half-precision parameters — each radius checked against an independent computation (torch.func.jvp by hand)."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from safestep import SafeStep
from safestep.bounds import Belief, Exact, Ghost, Weighted

from _small import small_data, small_mlp

IGNORE = -100


def _data(n=24, k=6, seed=0):
    return small_data(n, k, seed)


def _mlp(k=6, seed=0):
    return small_mlp(k, seed)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _reference(model, theta0, theta1, call):
    """(logits, slopes) at θ0 along (θ1 − θ0)/‖θ1 − θ0‖ by torch.func.jvp in float64: the independent reference."""
    delta = {n: (theta1[n] - theta0[n]).double() for n in theta0}
    tau = math.sqrt(sum(float((d**2).sum()) for d in delta.values()))
    twin = copy.deepcopy(model).double().eval()
    primal = {n: t.double() for n, t in theta0.items()}
    tangent = {n: d / tau for n, d in delta.items()}

    def as_double(value):
        if isinstance(value, torch.Tensor):
            return value.double() if value.is_floating_point() else value
        if isinstance(value, dict):
            return {k: as_double(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return type(value)(as_double(v) for v in value)
        return value

    logits, slopes = jvp(lambda p: call(lambda *a: functional_call(twin, p, as_double(a))), (primal,), (tangent,))
    return logits, slopes, tau


def _guarded_step(model, opt, x, y, **step):
    theta0 = _snapshot(model)
    opt.zero_grad()
    F.cross_entropy(model(x), y, ignore_index=IGNORE).backward()
    opt.step(**step)
    return theta0


def _unguarded_target(model, make_opt, x, y):
    """θ1: what the inner optimizer alone does from the same state (on a copy)."""
    twin = copy.deepcopy(model)
    opt = make_opt(twin.parameters())
    F.cross_entropy(twin(x), y, ignore_index=IGNORE).backward()
    opt.step()
    return _snapshot(twin)


# -- ignore_index ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bound", ["ghost", "weighted", "exact", "belief"])
def test_ignored_rows_drop_out_of_every_bound(bound):
    model = _mlp()
    x, y = _data()
    make = lambda p: torch.optim.SGD(p, lr=0.05)  # noqa: E731
    theta1 = _unguarded_target(model, make, x, y)
    logits, slopes, _ = _reference(model, _snapshot(model), theta1, lambda f: f(x))
    rule = {"ghost": Ghost(), "weighted": Weighted(), "exact": Exact(), "belief": Belief()}[bound]
    labels = y.clone()
    labels[rule.row_radii(logits, slopes, y).argsort()[:4]] = IGNORE  # ignore the rows that set the radius
    opt = SafeStep(make(model.parameters()), model, bound=bound, probe_size=None, mode="monitor")
    _guarded_step(model, opt, x, y, labels=labels)
    keep = labels != IGNORE
    expected = rule(logits[keep], slopes[keep], labels[keep]).item()
    assert opt.last_report.rho == pytest.approx(expected, rel=1e-5)
    assert rule(logits, slopes, y).item() < expected * (1 - 1e-3)  # with the ignored rows ρ would be smaller


def test_a_custom_ignore_index_and_labels_fn_are_honoured():
    model = _mlp()
    x, y = _data()
    y_custom = torch.where(torch.arange(len(y)) % 2 == 0, torch.full_like(y, -1), y)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.05), model, bound="belief", probe_size=None,
                   ignore_index=-1, labels_fn=lambda batch: y_custom)
    opt.zero_grad()
    F.cross_entropy(model(x), y_custom, ignore_index=-1).backward()
    opt.step()
    assert not opt.last_report.skipped and math.isfinite(opt.last_report.rho)


def test_every_row_ignored_means_no_constraint():
    model = _mlp()
    x, y = _data()
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.05), model, probe_size=None)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step(labels=torch.full_like(y, IGNORE))
    assert opt.last_report.rho == math.inf and opt.last_report.scale == 1.0


def test_quantiles_are_taken_over_the_active_rows_only():
    radii_rows = torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 4.0], [0.0, 8.0]], dtype=torch.float64)
    z = torch.zeros_like(radii_rows)
    labels = torch.tensor([0, IGNORE, 1, 0])
    # spreads 1, 4, 8 on the active rows → radii π, π/4, π/8; the 0.5-quantile of demand is the middle one
    assert Ghost(0.5)(z, radii_rows, labels).item() == pytest.approx(math.pi / 4)
    assert Ghost(1.0)(z, radii_rows, labels).item() == pytest.approx(math.pi / 8)


# -- masked classes ----------------------------------------------------------------------------------------------
class _Masked(nn.Module):
    """Logits with an action mask: disallowed classes get −inf (by masked_fill, or by adding −inf)."""

    def __init__(self, k=6, additive=False):
        super().__init__()
        self.net = _mlp(k)
        self.additive = additive
        self.active = True

    def forward(self, x):
        logits = self.net(x)
        if not self.active:
            return logits
        mask = (torch.arange(logits.shape[-1]) % 3 == 0) | (x[:, :1] > 0.5)  # per-row masks, class 1 always live
        mask[:, 1] = False
        if self.additive:
            return logits + torch.where(mask, -math.inf, 0.0)
        return logits.masked_fill(mask, -math.inf)


@pytest.mark.parametrize("method", ["jvp", "fd"])
@pytest.mark.parametrize("additive", [False, True])
def test_masked_classes_drop_out_and_the_model_trains(method, additive):
    model = _Masked(additive=additive)
    x, y = _data()
    y = torch.ones_like(y)  # class 1 is never masked
    make = lambda p: torch.optim.Adam(p, lr=1e-2)  # noqa: E731
    theta1 = _unguarded_target(model, make, x, y)
    opt = SafeStep(make(model.parameters()), model, probe_size=None, method=method, mode="monitor")
    theta0 = _guarded_step(model, opt, x, y)
    logits, slopes, _ = _reference(model, theta0, theta1, lambda f: f(x))
    live = torch.isfinite(logits)
    spread = torch.where(live, slopes, -math.inf).amax(-1) - torch.where(live, slopes, math.inf).amin(-1)
    assert not opt.last_report.skipped
    assert opt.last_report.rho == pytest.approx(math.pi / spread.max().item(), rel=1e-5 if method == "jvp" else 1e-3)


def test_masks_that_appear_later_are_measured_exactly_from_that_step_on():
    model = _Masked()
    model.active = False
    x, y = _data()
    y = torch.ones_like(y)
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model, probe_size=None, mode="monitor", method="fd")
    _guarded_step(model, opt, x, y)
    model.active = True
    theta1 = _unguarded_target(model, lambda p: _adam_twin(opt, p), x, y)
    theta0 = _guarded_step(model, opt, x, y)
    logits, slopes, _ = _reference(model, theta0, theta1, lambda f: f(x))
    live = torch.isfinite(logits)
    spread = torch.where(live, slopes, -math.inf).amax(-1) - torch.where(live, slopes, math.inf).amin(-1)
    assert opt.last_report.rho == pytest.approx(math.pi / spread.max().item(), rel=1e-3)


def _adam_twin(guard, params):
    """An Adam on ``params`` holding a copy of the guard's inner Adam state (so the twin takes the same step)."""
    twin = torch.optim.Adam(params, lr=1e-2)
    twin.load_state_dict(copy.deepcopy(guard.optimizer.state_dict()))
    return twin


@pytest.mark.parametrize("bound", [Exact(), Belief(), Weighted()])
def test_exact_and_belief_bounds_see_only_live_classes(bound):
    g = torch.Generator().manual_seed(3)
    z, a = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    dead = torch.zeros(5, 7, dtype=torch.bool)
    dead[:, [0, 4]] = True
    masked_z = z.masked_fill(dead, -math.inf)
    masked_a = a.masked_fill(dead, math.nan)  # a finite difference gives NaN slopes at masked classes
    live_cols = [1, 2, 3, 5, 6]
    labels = torch.tensor([1, 2, 3, 5, 6])
    expected = bound(z[:, live_cols], a[:, live_cols], torch.tensor([0, 1, 2, 3, 4])).item()
    assert bound(masked_z, masked_a, labels).item() == pytest.approx(expected, rel=1e-8)


# -- how the model is called -------------------------------------------------------------------------------------
class _DictNet(nn.Module):
    def __init__(self, container):
        super().__init__()
        self.net = _mlp()
        self.container = container

    def forward(self, batch):
        x = batch["x"] if self.container == "dict" else batch[0]
        return self.net(x * batch["scale"] if self.container == "dict" else x * batch[1])


@pytest.mark.parametrize("container", ["dict", "tuple", "list"])
def test_a_model_called_with_one_container_is_probed_as_it_was_called(container):
    model = _DictNet(container)
    x, y = _data()
    scale = torch.full((len(x), 1), 2.0)
    batch = {"x": x, "scale": scale} if container == "dict" else (x, scale) if container == "tuple" else [x, scale]
    make = lambda p: torch.optim.SGD(p, lr=0.5)  # noqa: E731
    twin = copy.deepcopy(model)
    inner = make(twin.parameters())
    F.cross_entropy(twin(batch), y).backward()
    inner.step()
    theta1 = _snapshot(twin)
    opt = SafeStep(make(model.parameters()), model, probe_size=None, mode="monitor")
    theta0 = _snapshot(model)
    F.cross_entropy(model(batch), y).backward()
    opt.step()
    logits, slopes, _ = _reference(model, theta0, theta1, lambda f: f(batch))
    assert opt.last_report.rho == pytest.approx(Ghost()(logits, slopes).item(), rel=1e-5)


# -- copies --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_guard_steps_its_copied_model(how):
    model = _mlp()
    x, y = _data()
    opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-2), model)
    _guarded_step(model, opt, x, y)
    copy_model, copy_opt = (copy.deepcopy((model, opt)) if how == "deepcopy"
                            else pickle.loads(pickle.dumps((model, opt))))
    original = _snapshot(model)
    before = _snapshot(copy_model)
    _guarded_step(copy_model, copy_opt, x, y)
    assert copy_opt.steps == 2 and not copy_opt.last_report.skipped
    assert any(not torch.equal(p, before[n]) for n, p in copy_model.named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # the original never moved
    _guarded_step(model, opt, x, y)
    assert opt.steps == 2 and opt.last_report.tau == pytest.approx(copy_opt.last_report.tau, rel=1e-6)


# -- sparse gradients ----------------------------------------------------------------------------------------------
class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.out = nn.Linear(8, 4)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


def test_sparse_embedding_gradients_with_sparse_adam_are_bounded():
    model = _Bag()
    ids = torch.randint(0, 50, (16, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(2))
    opt = SafeStep(torch.optim.SparseAdam(list(model.emb.parameters()), lr=5.0), model, r=0.5, probe_size=None,
                   logits_fn=lambda m, i: m(i))
    extra = torch.optim.SGD(model.out.parameters(), lr=0.0)
    theta0 = _snapshot(model)
    F.cross_entropy(model(ids), y).backward()
    extra.zero_grad()
    opt.step()
    report = opt.last_report
    moved = math.sqrt(sum(float(((p.detach().double() - theta0[n].double()) ** 2).sum())
                          for n, p in model.named_parameters()))
    assert report.capped and model.emb.weight.grad.is_sparse
    assert moved <= 0.5 * report.rho and moved == pytest.approx(0.5 * report.rho, rel=1e-3)
    model.emb.weight.grad = torch.sparse_coo_tensor([[0]], [[math.nan] * 8], (50, 8))
    opt.step(inputs=ids)
    assert opt.last_report.skipped and "non-finite gradient" in opt.last_report.reason


# -- precision ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_differences_agree_with_the_jvp_in_every_dtype(dtype):
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 6))
    torch.manual_seed(1)
    model = model.to(dtype)
    x, y = _data()
    rho = {}
    for method in ("jvp", "fd"):
        twin = copy.deepcopy(model)
        opt = SafeStep(torch.optim.SGD(twin.parameters(), lr=0.2), twin, method=method, probe_size=None, mode="monitor")
        F.cross_entropy(twin(x.to(dtype)).float(), y).backward()
        opt.step()
        rho[method] = opt.last_report.rho
    assert rho["fd"] == pytest.approx(rho["jvp"], rel=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["cap", "set"])
def test_the_realized_step_never_exceeds_r_rho(dtype, mode):
    x, y = _data(n=64)
    for seed in range(4):
        model = _mlp(seed=seed).to(dtype)
        opt = SafeStep(torch.optim.Adam(model.parameters(), lr=1.0), model, r=0.7, mode=mode, probe_size=None)
        for _ in range(3):
            theta0 = _snapshot(model)
            opt.zero_grad()
            F.cross_entropy(model(x.to(dtype)).float(), y).backward()
            opt.step()
            report = opt.last_report
            moved = math.sqrt(sum(float(((p.detach().double() - theta0[n].double()) ** 2).sum())
                                  for n, p in model.named_parameters()))
            assert report.scale < 1 and not report.skipped
            assert moved <= 0.7 * report.rho, (seed, moved / (0.7 * report.rho) - 1)
            if dtype == torch.float32:  # and not needlessly short
                assert moved >= 0.7 * report.rho * (1 - 1e-3)


# -- the wrapper -------------------------------------------------------------------------------------------------------
class _WithExtras(torch.optim.SGD):
    """An optimizer with attributes torch.optim does not define (like AdamWScheduleFree.train(), Prodigy's d)."""

    def __init__(self, params):
        super().__init__(params, lr=0.1)
        self.mode = "eval"
        self.d = 0.5

    def train(self):
        self.mode = "train"


def test_inner_optimizer_attributes_are_reachable_and_private_ones_are_not():
    model = _mlp()
    opt = SafeStep(_WithExtras(model.parameters()), model)
    opt.train()
    assert opt.optimizer.mode == "train" and opt.d == 0.5
    with pytest.raises(AttributeError):
        opt._no_such_private_name  # noqa: B018
    assert opt._step_supports_amp_scaling is False  # GradScaler must not pass found_inf to SafeStep.step


def test_bound_options_live_on_the_bound():
    model = _mlp()
    with pytest.raises(ValueError, match="conflicts"):
        SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=Ghost(), aggregate=0.5)
    opt = SafeStep(torch.optim.SGD(model.parameters(), lr=0.1), model, bound=Belief(rule="sharp", aggregate=0.9))
    assert opt.bound == Belief(rule="sharp", aggregate=0.9)
