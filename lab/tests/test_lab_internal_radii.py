"""Internal radii of the lab transformer, checked against finite differences, numpy and hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from safestep_lab.internal_radii import (
    Internals,
    Radii,
    TinyTransformer,
    attention_radius,
    bottleneck_radii,
    ffn_kink_radius,
    internal_slopes,
    output_radius,
)


def _tiny(n_heads: int = 1, n_layers: int = 1, seed: int = 0) -> tuple[TinyTransformer, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyTransformer(d_model=4, n_heads=n_heads, n_layers=n_layers, ffn_mult=2, n_classes=3).double()
    x = torch.rand(3, 64, dtype=torch.float64)
    return model, x


def _unit_direction(model: TinyTransformer, seed: int = 1, only: str | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    direction = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) if only is None or n.startswith(only)
                 else torch.zeros_like(p) for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float((d ** 2).sum()) for d in direction.values()))
    return {n: d / norm for n, d in direction.items()}


def _internals_at(model: TinyTransformer, x: torch.Tensor, direction: dict[str, torch.Tensor], t: float):
    """(logits, scores, preacts) at θ + t·v, by writing the parameters (restored afterwards)."""
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(t * direction[n])
        out = model(x, internals=True)
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return out


def _params(model: TinyTransformer) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def test_scores_are_q_dot_k_over_sqrt_d_of_the_first_block():
    model, x = _tiny()
    _, scores, _ = model(x, internals=True)
    with torch.no_grad():  # independent recomputation from the weights
        rows = x.reshape(3, 8, 8).numpy()
        tokens = rows @ model.embed.weight.numpy().T + model.embed.bias.numpy()
        cls = np.broadcast_to(model.cls.numpy(), (3, 1, 4))
        seq = np.concatenate([cls, tokens], axis=1) + model.position.numpy()
        mean, var = seq.mean(-1, keepdims=True), seq.var(-1, keepdims=True)
        block = model.blocks[0]
        normed = (seq - mean) / np.sqrt(var + block.norm_attn.eps) * block.norm_attn.weight.numpy() \
            + block.norm_attn.bias.numpy()
        q, k, _ = np.split(normed @ block.attn.qkv.weight.numpy().T, 3, axis=-1)
        expected = q @ np.swapaxes(k, -1, -2) / 2.0  # √d_head = √4
    assert scores.shape == (1, 3, 1, 9, 9)
    np.testing.assert_allclose(scores[0, :, 0].detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model(x), model(x, internals=True)[0])


def test_attention_radius_matches_hand_bound_from_finite_difference_slopes():
    model, x = _tiny()
    direction = _unit_direction(model)
    eps = 1e-5
    plus, minus = _internals_at(model, x, direction, eps)[1], _internals_at(model, x, direction, -eps)[1]
    slopes = ((plus - minus) / (2 * eps)).numpy()
    hand = math.pi / np.max(slopes.max(axis=-1) - slopes.min(axis=-1))  # π / max spread over keys
    ours = attention_radius(internal_slopes(model, _params(model), direction, x).score_slopes)
    assert ours == pytest.approx(hand, rel=1e-6)


def test_output_radius_matches_hand_bound_from_finite_difference_slopes():
    model, x = _tiny(n_heads=2, n_layers=2)
    direction = _unit_direction(model, seed=3)
    eps = 1e-5
    plus, minus = _internals_at(model, x, direction, eps)[0], _internals_at(model, x, direction, -eps)[0]
    slopes = ((plus - minus) / (2 * eps)).numpy()
    hand = math.pi / np.max(slopes.max(axis=1) - slopes.min(axis=1))
    internals = internal_slopes(model, _params(model), direction, x)
    assert output_radius(internals.logit_slopes) == pytest.approx(hand, rel=1e-6)
    assert internals.scores.shape == (2, 3, 2, 9, 9) and internals.preacts.shape == (2, 3, 9, 8)


def test_ffn_radius_is_the_quantile_of_known_kink_distances():
    """Moving only the last block's fc1, h is linear in t: its kink sits at t = −h(0)/(h(1) − h(0))."""
    model, x = _tiny(n_layers=2)
    direction = _unit_direction(model, seed=5, only="blocks.1.fc1")
    h0 = _internals_at(model, x, direction, 0.0)[2]
    h1 = _internals_at(model, x, direction, 1.0)[2]
    assert torch.equal(h0[0], h1[0])  # the first block does not move
    kinks = (h0[1] / (h0[1] - h1[1])).abs().numpy()
    internals = internal_slopes(model, _params(model), direction, x)
    for q in (0.01, 0.3, 0.5):
        # the first block's entries have ḣ = 0 and count as |h|/1e-12 (far away)
        distances = np.concatenate([h0[0].abs().numpy().ravel() / 1e-12, kinks.ravel()])
        expected = np.quantile(distances, q)
        assert ffn_kink_radius(internals.preacts, internals.preact_slopes, q) == pytest.approx(expected, rel=1e-8)
    nearest = float(kinks.min())
    flat = int(np.argmin(kinks))
    before = _internals_at(model, x, direction, 0.99 * nearest)[2][1].reshape(-1)[flat]
    after = _internals_at(model, x, direction, 1.01 * nearest)[2][1].reshape(-1)[flat]
    assert float(before) * float(after) < 0  # the pre-activation does cross zero there


def test_ffn_radius_small_case_by_hand_and_invalid_input():
    h = torch.tensor([1.0, -2.0, 3.0, 0.5])
    dh = torch.tensor([1.0, 1.0, -1.0, 0.0])  # distances 1, 2, 3, 5e11
    assert ffn_kink_radius(h, dh, 0.0) == pytest.approx(1.0)
    assert ffn_kink_radius(h, dh, 0.5) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="quantile"):
        ffn_kink_radius(h, dh, 1.5)
    with pytest.raises(ValueError, match="one shape"):
        ffn_kink_radius(h, dh[:2])


def test_radii_binding_and_jvp_leaves_parameters_untouched():
    radii = Radii(out=0.3, attn=2.0, ffn=0.1)
    assert radii.smallest == 0.1 and radii.binding == "ffn"
    assert Radii(out=0.05, attn=2.0, ffn=0.1).binding == "out"
    model, x = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    internals = internal_slopes(model, _params(model), _unit_direction(model), x)
    assert isinstance(internals, Internals)
    assert all(torch.equal(before[n], p) and p.grad is None for n, p in model.named_parameters())
    computed = bottleneck_radii(internals)
    assert computed.attn == attention_radius(internals.score_slopes)
    with pytest.raises(ValueError, match="same tensors"):
        internal_slopes(model, _params(model), {}, x)
