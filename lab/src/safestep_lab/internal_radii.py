"""Radii inside a transformer (docs/reproduction.md): the attention softmax and the FFN activation kinks.

Along a unit parameter direction v, one forward-mode pass (JVP) gives the slopes of three internal tensors:
the logits z (K classes), the pre-softmax attention scores s = q·kᵀ/√d (per layer, head and query, over the
keys) and the FFN pre-activations h (the input of the GELU). From them:

* ρ_out  = π / max_n spread_k(ż_n)                      — the output softmax radius (a certified lower bound);
* ρ_attn = π / max_{layer,n,head,query} spread_keys(ṡ)  — the same bound for every attention softmax;
* ρ_ffn  = Q_q(|h| / max(|ḣ|, 1e-12)) with q = 1%       — distance to the GELU "kink" at h = 0 along the
  linearised step (a proxy from the paper, not a theorem: exact GELU is entire).

``TinyTransformer`` is the paper's tfmbottlenecks model with the scores computed explicitly, so the JVP sees
them (``forward(x, internals=True)`` returns them); ``internal_slopes`` runs the JVP and ``bottleneck_radii``
turns its result into the three radii.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp

from safestep.geometry import radius_lower_bound

from .data import DIGITS_SIDE, as_row_tokens

__all__ = [
    "RADIUS_NAMES",
    "TinyTransformer",
    "Internals",
    "Radii",
    "internal_slopes",
    "output_radius",
    "attention_radius",
    "ffn_kink_radius",
    "bottleneck_radii",
]

RADIUS_NAMES = ("out", "attn", "ffn")
_SLOPE_FLOOR = 1e-12


class _Attention(nn.Module):
    """Multi-head self-attention with explicit scores s = q·kᵀ/√d_head (no mask); returns (output, scores)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, d) → output (N, T, d) and pre-softmax scores (N, heads, T_query, T_key)."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.n_heads)
        mixed = torch.softmax(scores, dim=-1) @ v
        return self.proj(mixed.transpose(1, 2).reshape(n, t, d)), scores


class _Block(nn.Module):
    """Pre-LN block: x ← x + Attn(LN(x)); h = fc1(LN(x)); x ← x + fc2(GELU(h)); returns (x, scores, h)."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = _Attention(d_model, n_heads)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_mult * d_model)
        self.fc2 = nn.Linear(ffn_mult * d_model, d_model)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(N, T, d) → (N, T, d), scores (N, heads, T, T), pre-activations h (N, T, m·d)."""
        mixed, scores = self.attn(self.norm_attn(x))
        x = x + mixed
        h = self.fc1(self.norm_ffn(x))
        return x + self.fc2(F.gelu(h)), scores, h


class TinyTransformer(nn.Module):
    """The paper's tfmbottlenecks model: 8 row tokens → Linear(8, d) + CLS + positions → blocks → LN(CLS) → head.

    Defaults (docs/reproduction.md): d = 32, 4 heads (d_head 8), 2 pre-LN blocks, FFN 32→128→32 with exact GELU,
    CLS token and positions (1, 9, d) drawn from N(0, 0.02²), bias-free qkv.
    """

    def __init__(self, d_model: int = 32, n_heads: int = 4, n_layers: int = 2, ffn_mult: int = 4,
                 n_classes: int = 10) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.embed = nn.Linear(DIGITS_SIDE, d_model)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, d_model))
        self.position = nn.Parameter(0.02 * torch.randn(1, DIGITS_SIDE + 1, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, ffn_mult) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor, internals: bool = False) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Flat digits (N, 64) → logits (N, K); with ``internals`` also scores (L, N, H, T, T) and h (L, N, T, F)."""
        tokens = self.embed(as_row_tokens(x))
        x = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1) + self.position
        all_scores, all_h = [], []
        for block in self.blocks:
            x, scores, h = block(x)
            all_scores.append(scores)
            all_h.append(h)
        logits = self.head(self.norm(x[:, 0]))
        if not internals:
            return logits
        return logits, torch.stack(all_scores), torch.stack(all_h)


@dataclass(frozen=True)
class Internals:
    """Values at θ0 and their slopes d/dτ along a unit direction: logits, attention scores, FFN pre-activations."""

    logits: Tensor
    logit_slopes: Tensor
    scores: Tensor
    score_slopes: Tensor
    preacts: Tensor
    preact_slopes: Tensor


@dataclass(frozen=True)
class Radii:
    """ρ_out, ρ_attn and ρ_ffn at one step; ``smallest`` is their minimum and ``binding`` its name."""

    out: float
    attn: float
    ffn: float

    def as_dict(self) -> dict[str, float]:
        """{"out": ρ_out, "attn": ρ_attn, "ffn": ρ_ffn}."""
        return {name: getattr(self, name) for name in RADIUS_NAMES}

    @property
    def smallest(self) -> float:
        """min(ρ_out, ρ_attn, ρ_ffn)."""
        return min(self.as_dict().values())

    @property
    def binding(self) -> str:
        """The name of the smallest radius (ties resolved in the order out, attn, ffn)."""
        values = self.as_dict()
        return min(RADIUS_NAMES, key=lambda name: values[name])


def internal_slopes(model: TinyTransformer, params: dict[str, Tensor], direction: dict[str, Tensor],
                    x: Tensor) -> Internals:
    """(z, ż, s, ṡ, h, ḣ) at θ0 = ``params`` along ``direction`` by one forward-mode JVP (no side effects)."""
    if params.keys() != direction.keys():
        raise ValueError("params and direction must name the same tensors")

    def forward(p: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        return functional_call(model, p, (x,), {"internals": True})

    with torch.no_grad():
        (z, s, h), (dz, ds, dh) = jvp(forward, (params,), (direction,))
    return Internals(z, dz, s, ds, h, dh)


def output_radius(logit_slopes: Tensor) -> float:
    """ρ_out = π / max_n (max_k ż_nk − min_k ż_nk) over the rows of (N, K) logit slopes."""
    if logit_slopes.ndim < 2:
        raise ValueError(f"logit slopes need shape (N, K), got {tuple(logit_slopes.shape)}")
    return float(radius_lower_bound(logit_slopes.reshape(-1, logit_slopes.shape[-1])).amin())


def attention_radius(score_slopes: Tensor) -> float:
    """ρ_attn = π / max over every (layer, sample, head, query) of the spread of ṡ over the keys (last dim)."""
    if score_slopes.ndim < 2:
        raise ValueError(f"score slopes need a trailing key dimension, got {tuple(score_slopes.shape)}")
    return float(radius_lower_bound(score_slopes.reshape(-1, score_slopes.shape[-1])).amin())


def ffn_kink_radius(preacts: Tensor, preact_slopes: Tensor, quantile: float = 0.01) -> float:
    """ρ_ffn = Q_q(|h| / max(|ḣ|, 1e-12)) over every entry (linear interpolation, as ``torch.quantile``)."""
    if preacts.shape != preact_slopes.shape or preacts.numel() == 0:
        raise ValueError(f"pre-activations {tuple(preacts.shape)} and slopes {tuple(preact_slopes.shape)} "
                         "must be non-empty and of one shape")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    distances = (preacts.abs() / preact_slopes.abs().clamp_min(_SLOPE_FLOOR)).reshape(-1).double()
    position = quantile * (distances.numel() - 1)
    lower, upper = math.floor(position), math.ceil(position)
    low = distances.kthvalue(lower + 1).values
    high = distances.kthvalue(upper + 1).values if upper != lower else low
    return float(low + (position - lower) * (high - low))


def bottleneck_radii(internals: Internals, ffn_quantile: float = 0.01) -> Radii:
    """(ρ_out, ρ_attn, ρ_ffn) from one JVP's slopes (see the module docstring)."""
    return Radii(
        out=output_radius(internals.logit_slopes),
        attn=attention_radius(internals.score_slopes),
        ffn=ffn_kink_radius(internals.preacts, internals.preact_slopes, ffn_quantile),
    )
