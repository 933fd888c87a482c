"""The "support" rule (docs/belief_support.md) against eigvalsh and brute force.

Brute force: the Euclidean Lipschitz constant on T = {Σv = 0} of the exact projected step p ↦ Π_Δ(p + ηy/p) and of
the exact mirror step p ↦ softmax(log p + ηy/p), measured at random beliefs by Lanczos on (J P_T)ᵀ(J P_T) with
Jacobian products from forward- and reverse-mode autodiff of test-local implementations of the two maps (checked
against the lab's ``projected_step``/``mirror_step`` in lab/tests/test_lab_belief_maps.py, which also holds the
global contraction identity). The projection here finds its support by bisection on Σ max(v − θ, 0) = 1,
independently of the lab's sort-based algorithm.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import Tensor

from safestep.geometry import belief_step_cap, max_step
from safestep.geometry.simplex import RULES, ads_step

# torch.func's first use imports a module that warns about torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
f64 = torch.float64
LIP_TOL = 1e-7  # Lanczos and autodiff are exact to ~1e-13; a step counts as expansive above 1 + LIP_TOL
Step = Callable[[Tensor, Tensor, float], Tensor]


# ------------------------------------------------------------------------------------------- brute-force kit

def projection_support(v: Tensor) -> Tensor:
    """The coordinates kept by Π_Δ(v): v_i > θ where Σ_i max(v_i − θ, 0) = 1, θ found by bisection."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(110):
        mid = 0.5 * (lo + hi)
        above = (v - mid).clamp(min=0).sum() > 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return v > 0.5 * (lo + hi)


def exact_projected(support: Tensor) -> Step:
    """p ↦ Π_Δ(p + ηy/p) with the projection's support frozen (it is locally constant), so autodiff sees the map."""
    def step(p: Tensor, y: Tensor, eta: float) -> Tensor:
        v = p + eta * y / p
        theta = ((v * support).sum() - 1.0) / support.sum()
        return torch.where(support, v - theta, 0.0)
    return step


def exact_mirror(p: Tensor, y: Tensor, eta: float) -> Tensor:
    """p ↦ softmax(log p + ηy/p), the exponentiated-gradient step on E(p) = −Σ y log p."""
    return torch.softmax(p.log() + eta * y / p, dim=-1)


def tangent_lipschitz(step: Step, p: Tensor, y: Tensor, eta: float, iters: int = 40) -> float:
    """σ_max of the Jacobian of p ↦ step(p, y, eta) on T, by Lanczos (full reorthogonalisation) on (J P_T)ᵀ(J P_T)."""
    k = p.numel()
    f = lambda q: step(q, y, eta)
    _, vjp = torch.func.vjp(f, p)

    def normal_operator(v: Tensor) -> Tensor:
        u = vjp(torch.func.jvp(f, (p,), (v - v.mean(),))[1])[0]
        return u - u.mean()

    start = torch.randn(k, generator=torch.Generator().manual_seed(k), dtype=f64)
    basis = [(start - start.mean()) / (start - start.mean()).norm()]
    alphas, betas = [], []
    for _ in range(min(k - 1, iters)):
        w = normal_operator(basis[-1])
        alphas.append(torch.dot(w, basis[-1]))
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
        beta = w.norm()
        if beta <= 1e-12 * max(1.0, abs(alphas[-1].item())):
            break
        betas.append(beta)
        basis.append(w / beta)
    tridiagonal = torch.diag(torch.stack(alphas))
    off = torch.stack(betas[: len(alphas) - 1]) if len(alphas) > 1 else torch.zeros(0, dtype=f64)
    tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
    return math.sqrt(max(torch.linalg.eigvalsh(tridiagonal)[-1].item(), 0.0))


def projected_lipschitz(p: Tensor, y: Tensor, eta: float) -> float:
    return tangent_lipschitz(exact_projected(projection_support(p + eta * y / p)), p, y, eta)


def mirror_lipschitz(p: Tensor, y: Tensor, eta: float) -> float:
    return tangent_lipschitz(exact_mirror, p, y, eta)


def first_expansive_step(lipschitz: Callable[[float], float], start: float, grow: float = 1.5,
                         limit: float = 1e8, refine: int = 16) -> float:
    """The smallest η > start with lipschitz(η) > 1 (×grow grid, geometric bisection); inf if none ≤ limit·start."""
    lo = start
    while lo < limit * start:
        hi = lo * grow
        if lipschitz(hi) > 1 + LIP_TOL:
            for _ in range(refine):
                mid = math.sqrt(lo * hi)
                lo, hi = (lo, mid) if lipschitz(mid) > 1 + LIP_TOL else (mid, hi)
            return hi
        lo = hi
    return math.inf


def belief_kinds(k: int, g: torch.Generator) -> Iterator[tuple[str, Tensor]]:
    """Random beliefs from very diffuse to very peaked, Gaussian and Zipf-like (language-model-like) logits."""
    noise = lambda: torch.randn(k, generator=g, dtype=f64)
    ranks = torch.randperm(k, generator=g).to(f64) + 1
    dominant = noise()
    dominant[int(torch.randint(0, k, (1,), generator=g))] += 25.0
    logits = {"diffuse": 0.01 * noise(), "gaussian": noise(), "peaked": 5.0 * noise(), "very peaked": 12.0 * noise(),
              "dominant": dominant, "zipf": -1.1 * ranks.log() + 0.3 * noise(),
              "sharp zipf": -3.0 * ranks.log() + noise()}
    for kind, z in logits.items():
        yield kind, torch.softmax(z, dim=-1)


def label_choices(p: Tensor, g: torch.Generator) -> dict[str, int]:
    order = p.argsort(descending=True)
    return {"argmax": int(order[0]), "median": int(order[len(order) // 2]),
            "random": int(torch.randint(0, len(p), (1,), generator=g))}


def smoothed(label: int, k: int, smoothing: float) -> Tensor:
    y = torch.full((k,), smoothing / k, dtype=f64)
    y[label] += 1.0 - smoothing
    return y


def cases(k: int, seed: int, labels: tuple[str, ...] = ("argmax", "median", "random"),
          smoothings: tuple[float, ...] = (0.0, 0.1)) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(description, belief, target) for every belief kind × label choice × smoothing."""
    g = torch.Generator().manual_seed(seed)
    for kind, p in belief_kinds(k, g):
        choices = label_choices(p, g)
        for name in labels:
            for s in smoothings:
                yield f"K={k} {kind} label={name} s={s}", p, smoothed(choices[name], k, s)


# ------------------------------------------------------------------------------------------- closed forms

def tangent_top_eigenvalue(d: np.ndarray) -> float:
    """λ_max of P_T diag(d) P_T, dense."""
    k = len(d)
    proj = np.eye(k) - np.ones((k, k)) / k
    return float(np.linalg.eigvalsh(proj @ np.diag(d) @ proj)[-1])


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_support_rule_is_two_over_top_eigenvalue_of_the_true_hessian(k):
    g = torch.Generator().manual_seed(k)
    p = torch.distributions.Dirichlet(torch.ones(k, dtype=f64)).sample((6,))
    targets = [torch.distributions.Dirichlet(torch.full((k,), 0.5, dtype=f64)).sample((6,)),
               torch.stack([smoothed(int(torch.randint(0, k, (1,), generator=g)), k, 0.1) for _ in range(6)])]
    for y in targets:
        rule = max_step(p, "support", target=y)
        for i in range(6):
            d = (y[i] / p[i] ** 2).numpy()
            assert rule[i].item() == pytest.approx(2 / tangent_top_eigenvalue(d), rel=1e-9)


@pytest.mark.parametrize("k", [2, 3, 10, 1000, 50_000])
def test_one_hot_support_rule_closed_form_is_free_of_the_vocabulary(k):
    g = torch.Generator().manual_seed(1)
    rest = torch.rand(k - 1, generator=g, dtype=f64) ** 8  # a long tail of tiny probabilities
    p = torch.cat([torch.tensor([0.3], dtype=f64), 0.7 * rest / rest.sum()])
    y = torch.zeros(k, dtype=f64)
    y[0] = 1.0
    expected = 2 * 0.3**2 * k / (k - 1)
    assert max_step(p, "support", target=y).item() == pytest.approx(expected, rel=1e-12)
    if k >= 1000:
        assert max_step(p, "paper").item() < 1e-6 * expected  # the Fisher proxy collapses with min p
    else:
        d = np.zeros(k)
        d[0] = 1 / 0.3**2
        assert expected == pytest.approx(2 / tangent_top_eigenvalue(d), rel=1e-9)


def test_support_rule_defaults_and_consistency():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(4, 6, generator=g, dtype=f64) * 2, dim=-1)
    # at the fixed point y = p the true Hessian diag(y/p²) is the Fisher proxy diag(1/p): "support" = "tangent"
    assert torch.allclose(max_step(p, "support", target=p), max_step(p, "tangent"), rtol=1e-12)
    assert torch.equal(max_step(p, "support"), max_step(p, "support", target=p))  # the default target is p
    predicted = torch.nn.functional.one_hot(p.argmax(-1), 6).to(f64)
    assert torch.allclose(max_step(p, "support", target=predicted), 2 * p.amax(-1) ** 2 * 6 / 5, rtol=1e-14)
    backed = ads_step(p, "support", target=predicted)
    assert torch.allclose(backed, max_step(p, "support", target=predicted) * (ads_step(p) / max_step(p)), rtol=1e-12)
    on_boundary = torch.tensor([0.0, 0.3, 0.7], dtype=f64)
    expected = 2 / tangent_top_eigenvalue(np.array([0.0, 1 / 0.3, 1 / 0.7]))  # class 0 carries no target mass
    assert max_step(on_boundary, "support").item() == pytest.approx(expected, rel=1e-12)
    assert max_step(on_boundary, "support", target=torch.tensor([0.0, 0.0, 1.0], dtype=f64)).item() == pytest.approx(
        2 * 0.49 * 1.5, rel=1e-14)
    assert max_step(on_boundary, "support", target=torch.tensor([1.0, 0.0, 0.0], dtype=f64)).item() == 0.0


def test_support_rule_validation():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=f64)
    with pytest.raises(ValueError, match="support"):
        max_step(p, "tangent", target=p)
    with pytest.raises(ValueError, match="shape"):
        max_step(p, "support", target=torch.tensor([0.5, 0.5], dtype=f64))
    with pytest.raises(ValueError, match="sum to 1"):
        ads_step(p, "support", target=torch.tensor([0.5, 0.4, 0.4], dtype=f64))
    assert "support" in RULES


# ------------------------------------------------------------------ brute force: local Lipschitz constants

def _never_expansive_below_the_rule(k: int, seed: int, labels: tuple[str, ...], fractions: tuple[float, ...]) -> None:
    for description, p, y in cases(k, seed, labels=labels):
        rule = max_step(p, "support", target=y).item()
        for fraction in fractions:
            lip = projected_lipschitz(p, y, fraction * rule)
            assert lip <= 1 + LIP_TOL, (description, fraction, lip)
            lip = mirror_lipschitz(p, y, fraction * rule)
            assert lip <= 1 + LIP_TOL, (description, fraction, lip)


@pytest.mark.parametrize("k, labels, fractions", [(3, ("argmax", "median", "random"), (0.5, 1.0)),
                                                   (12, ("argmax", "median", "random"), (0.5, 1.0)),
                                                   (200, ("argmax", "random"), (1.0,))])
def test_no_step_below_the_rule_expands(k, labels, fractions):
    _never_expansive_below_the_rule(k, seed=10 + k, labels=labels, fractions=fractions)


@pytest.mark.parametrize("k", [8192, 50_000])
@pytest.mark.slow
def test_no_step_below_the_rule_expands_at_vocabulary_scale(k):
    _never_expansive_below_the_rule(k, seed=10 + k, labels=("argmax", "random"), fractions=(1.0,))


@pytest.mark.parametrize("k", [3, 30, 300])
def test_projected_threshold_is_tight_for_one_hot_labels(k):
    """The first expansive η of the projected step is 2p_c²|A|/(|A| − 1) ∈ [1, 2]× the rule (A = the coordinates the
    projection keeps; exactly 1× when it keeps all K), unless the step lands on the vertex e_c (never expansive)."""
    finite = 0
    for description, p, y in cases(k, seed=20 + k, labels=("median", "random"), smoothings=(0.0,)):
        rule = max_step(p, "support", target=y).item()
        measured = first_expansive_step(lambda eta: projected_lipschitz(p, y, eta), rule, limit=10.0, refine=6)
        assert measured >= rule, description
        if math.isfinite(measured):
            finite += 1
            assert measured <= 2.0 * rule * 1.01, (description, measured / rule)
    assert finite >= 6


def test_smoothed_projected_threshold_tracks_the_tail():
    """With label smoothing s the tail curvature s/(K p_k²) binds: the measured threshold is the rule, not the label."""
    k = 100
    p = torch.softmax(torch.randn(k, generator=torch.Generator().manual_seed(3), dtype=f64) * 3, dim=-1)
    y = smoothed(int(p.argmax()), k, 0.1)
    rule = max_step(p, "support", target=y).item()
    measured = first_expansive_step(lambda eta: projected_lipschitz(p, y, eta), rule, limit=10.0, refine=8)
    assert measured == pytest.approx(rule, rel=0.01)
    assert rule <= 2 * k * p.min().item() ** 2 / (0.1 * (1 - 1 / k))  # below the tail bound 2K·min p²/(s(1 − 1/K)) ...
    assert rule < 1e-3 * max_step(p, "support").item()  # ... and far below the one-hot label's 2p_c²K/(K−1)


# ------------------------------------------------------------------ the pull-back cap

def test_support_cap_against_finite_differences():
    """One-hot: τ_max·|d log p_c/dτ| = 2; smoothed: τ_max·‖dp/dτ‖ = 2/θ_max(diag(y/p²))·‖P_T(−y/p)‖."""
    g = torch.Generator().manual_seed(6)
    k, n = 7, 30
    z, a = torch.randn(n, k, generator=g, dtype=f64) * 2, torch.randn(n, k, generator=g, dtype=f64)
    labels = torch.randint(0, k, (n,), generator=g)
    tau = 1e-7
    speed = ((torch.softmax(z + tau * a, -1) - torch.softmax(z - tau * a, -1)).norm(dim=-1) / (2 * tau)).numpy()
    p = torch.softmax(z, -1).numpy()
    p_label = p[np.arange(n), labels.numpy()]
    cap = belief_step_cap(z, a, labels, rule="support", backoff=False).numpy()
    rows = np.arange(n), labels.numpy()
    label_speed = np.abs((torch.log_softmax(z + tau * a, -1) - torch.log_softmax(z - tau * a, -1)).numpy()[rows]) / (2 * tau)
    np.testing.assert_allclose(cap * label_speed, 2.0, rtol=1e-6)  # the loss −log p_c moves by 2 nats to first order
    assert (cap * speed <= 2 * p_label * np.sqrt(k / (k - 1)) * (1 + 1e-9)).sum() < n  # looser than the whole-move rule
    s = 0.2
    y = np.full((n, k), s / k)
    y[np.arange(n), labels.numpy()] += 1 - s
    eta = np.array([2 / tangent_top_eigenvalue(y[i] / p[i] ** 2) for i in range(n)])
    grad = -y / p
    grad_t = np.linalg.norm(grad - grad.mean(-1, keepdims=True), axis=-1)
    smoothed_cap = belief_step_cap(z, a, labels, rule="support", backoff=False, smoothing=s).numpy()
    np.testing.assert_allclose(smoothed_cap * speed, eta * grad_t, rtol=1e-6)


def test_support_cap_without_labels_uses_the_predicted_class():
    g = torch.Generator().manual_seed(8)
    z, a = torch.randn(3, 5, 9, generator=g, dtype=f64), torch.randn(3, 5, 9, generator=g, dtype=f64)
    for rule in RULES:
        predicted = belief_step_cap(z, a, z.argmax(-1), rule=rule)
        assert torch.allclose(belief_step_cap(z, a, rule=rule), predicted, rtol=1e-14)
    with pytest.raises(ValueError, match="smoothing"):
        belief_step_cap(z, a, rule="support", smoothing=1.0)
