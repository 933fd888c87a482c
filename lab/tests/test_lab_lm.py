"""The GPT-style causal LM: config and presets, shapes, GPT-2 initialisation, causality, forward-mode AD, loss."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call, jvp

from safestep_lab.lm import GPT, GPT_PRESETS, GPTConfig, evaluate_lm, gpt_config, lm_loss
from safestep_lab.text import IGNORE_INDEX, make_windows

TINY = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=16, seq_len=12)


def tiny(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(replace(TINY, **overrides)).to(dtype)


def test_presets_have_the_named_sizes() -> None:
    byte, bpe = GPT_PRESETS["byte"], GPT_PRESETS["bpe"]
    assert (byte.vocab_size, byte.n_layer, byte.d_model, byte.seq_len) == (256, 2, 64, 64)
    assert (bpe.vocab_size, bpe.n_layer, bpe.d_model, bpe.seq_len) == (8192, 2, 128, 128)
    torch.manual_seed(0)
    counts = {name: sum(p.numel() for p in GPT(config).parameters()) for name, config in GPT_PRESETS.items()}
    assert counts == {"byte": 120_576, "bpe": 1_461_760}
    assert gpt_config("bpe", vocab_size=1000, dropout=0.1) == GPTConfig(1000, 2, 4, 128, 128, dropout=0.1)
    with pytest.raises(ValueError, match="unknown preset"):
        gpt_config("huge")


@pytest.mark.parametrize("bad, match", [({"d_model": 30, "n_head": 4}, "divisible"), ({"n_layer": 0}, "positive"),
                                        ({"dropout": 1.0}, "dropout")])
def test_config_rejects_bad_sizes(bad: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        replace(TINY, **bad)


def test_forward_shapes_and_length_check() -> None:
    model = tiny()
    ids = torch.randint(0, 50, (3, 12))
    assert model(ids).shape == (3, 12, 50) and model(ids[:, :5]).shape == (3, 5, 50)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 13, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(ids[0])


def test_head_is_tied_unless_asked_and_init_is_gpt2() -> None:
    model = tiny(n_layer=8, d_model=64, vocab_size=2000)
    assert model.lm_head.weight is model.wte.weight
    assert sum(1 for name, _ in model.named_parameters() if name.endswith("lm_head.weight")) == 0
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight and "lm_head.weight" in dict(untied.named_parameters())
    assert math.isclose(model.wte.weight.std().item(), 0.02, rel_tol=0.05)
    assert math.isclose(model.blocks[0].mlp.fc.weight.std().item(), 0.02, rel_tol=0.05)
    scaled = 0.02 / math.sqrt(2 * 8)
    assert math.isclose(model.blocks[3].attn.proj.weight.std().item(), scaled, rel_tol=0.05)
    assert math.isclose(model.blocks[3].mlp.proj.weight.std().item(), scaled, rel_tol=0.05)
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biases and all(b.abs().max() == 0 for b in biases)


@pytest.mark.parametrize("position", [0, 4, 11])
def test_logits_are_causal(position: int) -> None:
    model = tiny(torch.float64).eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, position] = (changed[:, position] + 7) % 50
    before, after = model(ids), model(changed)
    assert torch.equal(before[:, :position], after[:, :position])
    assert (before[:, position:] - after[:, position:]).abs().amax(dim=-1).min() > 1e-6  # every later position moves


def test_jvp_matches_a_central_difference_in_float64() -> None:
    model = tiny(torch.float64, dropout=0.1).eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(3)
    direction = {name: torch.randn(p.shape, generator=gen, dtype=torch.float64) for name, p in params.items()}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in direction.values()]))
    direction = {name: d / norm for name, d in direction.items()}  # unit length: h is a step length

    def logits_at(step: float) -> torch.Tensor:
        moved = {name: p.detach() + step * direction[name] for name, p in params.items()}
        return functional_call(model, moved, (ids,))

    with torch.no_grad(), forward_ad.dual_level():
        duals = {name: forward_ad.make_dual(p.detach(), direction[name]) for name, p in params.items()}
        tangent = forward_ad.unpack_dual(functional_call(model, duals, (ids,))).tangent
        h = 1e-5
        central = (logits_at(h) - logits_at(-h)) / (2 * h)
    assert tangent is not None and tangent.shape == (2, 12, 50)
    assert (tangent - central).abs().max() <= 1e-7 * tangent.abs().max()  # FD error O(h²) ≈ 1e-10 relative
    with torch.no_grad():  # torch.func.jvp reaches the same rule through the math-kernel fallback
        _, functorch_tangent = jvp(lambda p: functional_call(model, p, (ids,)),
                                   ({n: p.detach() for n, p in params.items()},), (direction,))
    assert torch.allclose(functorch_tangent, tangent, rtol=1e-10, atol=1e-12)


def test_lm_loss_ignores_padding() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, IGNORE_INDEX], [0, IGNORE_INDEX, IGNORE_INDEX]])
    picked = [(0, 0, 1), (0, 1, 2), (1, 0, 0)]
    expected = -sum(F.log_softmax(logits[b, t], -1)[y] for b, t, y in picked) / 3
    assert torch.allclose(lm_loss(logits, labels), expected)
    assert torch.allclose(lm_loss(logits, labels, reduction="sum"), 3 * expected)
    with pytest.raises(ValueError, match="do not match"):
        lm_loss(logits, labels[:, :2])


def test_evaluate_lm_is_token_weighted_deterministic_and_restores_mode() -> None:
    model = tiny(dropout=0.3).train()
    windows = make_windows(torch.randint(0, 50, (40,), generator=torch.Generator().manual_seed(4)), 12)
    assert (windows.labels == IGNORE_INDEX).any()  # 39 labels: the last window is padded
    loss = evaluate_lm(model, windows, batch_size=2)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(windows.inputs)
    assert math.isclose(loss, lm_loss(logits, windows.labels).item(), rel_tol=1e-5)
    assert evaluate_lm(model, windows, batch_size=3) == pytest.approx(loss, rel=1e-5) and not model.training


def test_a_few_adamw_steps_learn_bytes() -> None:
    torch.manual_seed(0)
    model = GPT(gpt_config("byte", seq_len=32))
    stream = torch.tensor(list(b"def add(a, b):\n    return a + b\n\n" * 40))
    windows = make_windows(stream, 32, drop_last=True)
    before = evaluate_lm(model, windows)
    assert math.isclose(before, math.log(256), rel_tol=0.02)  # a fresh GPT-2 init predicts ~uniformly
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        lm_loss(model(windows.inputs), windows.labels).backward()
        optimizer.step()
    assert evaluate_lm(model, windows) < 0.5 * before
