"""Bounds: checked against closed forms (π/Δ, the binary radius) and numpy re-derivations of the formulas."""
import math

import numpy as np
import pytest
import torch

from safestep.bounds import Belief, Bound, Exact, Ghost, Min, aggregate_radii, make_bound


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_aggregate_max_is_min_and_quantile_is_order_statistic():
    radii = torch.rand(101, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    assert aggregate_radii(radii, "max").item() == radii.min().item()
    assert aggregate_radii(radii, 1.0).item() == radii.min().item()
    srt = np.sort(radii.numpy())
    for q in (0.99, 0.9, 0.5):
        assert aggregate_radii(radii, q).item() == srt[math.floor((1 - q) * 100)]


def test_aggregate_handles_infinite_radii():
    radii = torch.tensor([math.inf, 2.0, math.inf, 1.0])
    assert aggregate_radii(radii, "max").item() == 1.0
    assert aggregate_radii(torch.full((3,), math.inf), 0.5).item() == math.inf


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1, True, "median", None])
def test_aggregate_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="aggregate"):
        aggregate_radii(torch.ones(3), bad)


def test_ghost_is_pi_over_max_spread_over_every_position():
    z, a = _rand(4, 5, 7, seed=1), _rand(4, 5, 7, seed=2)  # (B, T, V): every position is a row
    spreads = a.numpy().max(-1) - a.numpy().min(-1)
    assert Ghost()(z, a).item() == pytest.approx(math.pi / spreads.max(), rel=1e-12)
    q = 0.9
    rows = np.sort(math.pi / spreads.reshape(-1))
    assert Ghost(q)(z, a).item() == pytest.approx(rows[math.floor((1 - q) * 19)], rel=1e-12)


def test_ghost_without_spread_is_infinite():
    z = _rand(3, 4)
    assert Ghost()(z, torch.full((3, 4), 0.7, dtype=torch.float64)).item() == math.inf


def test_exact_binary_matches_closed_form_and_exceeds_ghost():
    z, a = _rand(6, 2, seed=3), _rand(6, 2, seed=4)
    delta = (z[:, 0] - z[:, 1]).numpy()
    spread = np.abs((a[:, 0] - a[:, 1]).numpy())
    closed = np.sqrt(delta**2 + math.pi**2) / spread
    assert Exact()(z, a).item() == pytest.approx(closed.min(), rel=1e-6)
    assert Exact(0.5)(z, a).item() == pytest.approx(np.sort(closed)[math.floor(0.5 * 5)], rel=1e-6)
    z3, a3 = _rand(8, 5, seed=5), _rand(8, 5, seed=6)
    assert Exact()(z3, a3).item() >= Ghost()(z3, a3).item() * (1 - 1e-9)


def _belief_caps_numpy(z, a, labels, backoff):
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    k = z.shape[-1]
    eta = 2 * p.min(-1) ** 2 / p.max(-1)
    if backoff:
        B = -(p * np.log(p)).sum(-1) / math.log(k)
        eta = eta / (1 - np.log(1 - B + 1e-10))
    label_p = p.max(-1) if labels is None else p[np.arange(len(p)), labels]
    g_tangent = math.sqrt((k - 1) / k) / label_p
    js = np.einsum("nij,nj->ni", np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p]), a)
    return eta * g_tangent / np.linalg.norm(js, axis=-1)


@pytest.mark.parametrize("backoff", [True, False])
def test_belief_paper_rule_matches_pulled_back_formula(backoff):
    z, a = _rand(10, 4, seed=7), _rand(10, 4, seed=8)
    labels = torch.arange(10) % 4
    caps = _belief_caps_numpy(z.numpy(), a.numpy(), labels.numpy(), backoff)
    assert Belief("paper", backoff=backoff)(z, a, labels).item() == pytest.approx(caps.min(), rel=1e-9)
    caps_pred = _belief_caps_numpy(z.numpy(), a.numpy(), None, backoff)
    assert Belief("paper", backoff=backoff)(z, a).item() == pytest.approx(caps_pred.min(), rel=1e-9)


def test_the_default_belief_rule_limits_the_label_loss_change_to_two_nats_within_the_ghost_radius():
    z, a = _rand(12, 50, seed=13), _rand(12, 50, seed=14)
    labels = torch.arange(12) * 4
    a[::2].scatter_add_(1, labels[::2, None], torch.full((6, 1), 10.0, dtype=a.dtype))  # here the pull-back binds
    p = np.exp(z.numpy() - z.numpy().max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    rows = np.arange(12), labels.numpy()
    label_slope = a.numpy()[rows] - (p * a.numpy()).sum(-1)  # d log p_c / dτ
    ghost = math.pi / np.ptp(a.numpy(), axis=-1)
    expected = np.minimum(2 / np.abs(label_slope), ghost)
    np.testing.assert_allclose(Belief(backoff=False, certified=Ghost()).row_radii(z, a, labels).numpy(), expected,
                               rtol=1e-9)
    assert (expected < ghost).any() and (expected == ghost).any()


def test_belief_labels_follow_sequence_rows_and_shape_is_checked():
    z, a = _rand(2, 3, 4, seed=9), _rand(2, 3, 4, seed=10)
    labels = torch.tensor([[0, 1, 2], [3, 0, 1]])
    flat = Belief()(z.reshape(6, 4), a.reshape(6, 4), labels.reshape(6))
    assert Belief()(z, a, labels).item() == flat.item()
    with pytest.raises(ValueError, match="labels"):
        Belief()(z, a, torch.tensor([0, 1]))


def test_min_takes_the_smallest_radius_and_composes():
    z, a = _rand(5, 3, seed=11), _rand(5, 3, seed=12)
    parts = [Ghost(), Exact(), Belief()]
    expected = min(b(z, a).item() for b in parts)
    combined = make_bound(["ghost", "exact", "belief"])
    assert isinstance(combined, Min) and combined.name == "min(ghost,exact,belief)"
    assert combined(z, a).item() == expected


def test_make_bound_accepts_names_bounds_and_lists():
    assert make_bound("ghost", 0.9) == Ghost(0.9)
    assert make_bound(["exact"]) == Exact()
    assert make_bound(Belief("sharp", False)) == Belief("sharp", False)

    class HalfGhost:  # the protocol: one method and three attributes, no __call__ and no aggregation of its own
        name = "half"
        aggregate = "max"
        accepts_nonfinite = True

        def row_radii(self, logits, slopes, labels=None, *, masked=None):
            return Ghost().row_radii(logits, slopes, labels, masked=masked) / 2

    custom = HalfGhost()
    assert isinstance(custom, Bound) and make_bound(custom) is custom
    z, a = _rand(3, 3), _rand(3, 3, seed=1)
    assert make_bound(["ghost", custom])(z, a).item() == pytest.approx(Ghost()(z, a).item() / 2)
    del HalfGhost.accepts_nonfinite  # part of the protocol: a bound must say whether it screens its input
    with pytest.raises(ValueError, match="accepts_nonfinite"):
        make_bound(HalfGhost())
    with pytest.raises(ValueError, match="rule"):
        Belief("loose")
    for bad in ("gost", [], 3):
        with pytest.raises(ValueError):
            make_bound(bad)


@pytest.mark.parametrize("spec", [Ghost(), Belief(), ["ghost", Exact()]])
def test_an_aggregate_that_conflicts_with_a_bound_object_raises(spec):
    with pytest.raises(ValueError, match="conflicts"):
        make_bound(spec, 0.5)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        Ghost()(_rand(3, 4), _rand(3, 5))


def test_the_weighted_bound_lies_between_the_ghost_bound_and_the_exact_radius_row_by_row():
    from safestep.bounds import Weighted

    z, a = _rand(40, 7) * 3, _rand(40, 7, seed=1)
    labels = torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(2))
    ghost, weighted, exact = (b.row_radii(z, a, labels) for b in (Ghost(), Weighted(), Exact()))
    assert bool((ghost <= weighted * (1 + 1e-12)).all()) and bool((weighted <= exact * (1 + 1e-9)).all())
    assert float((weighted / ghost).median()) > 1.2  # it weighs classes by probability: tighter than π/Δ_a
    binding = int(weighted.argmin())

    def close_below(value, row_min):  # the whole-batch minimum: certified (never above), within its bisection's rtol
        return row_min * (1 - 2e-3) <= value <= row_min * (1 + 1e-12)

    assert close_below(Weighted()(z, a, labels).item(), float(weighted.min()))
    labels[binding] = -100  # the binding row leaves the loss: the minimum moves to the next row
    assert close_below(Weighted()(z, a, labels).item(), float(weighted.sort().values[1]))
    assert make_bound("weighted") == Weighted()
