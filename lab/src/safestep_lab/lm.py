"""A GPT-style causal language model built from a config (pure torch, no weights downloaded), its loss and evaluation.

Architecture (GPT-2 layout): token + learned positional embeddings, ``n_layer`` pre-LN blocks
``x += attn(LN(x)); x += mlp(LN(x))`` with causal multi-head attention through
``F.scaled_dot_product_attention(is_causal=True)`` and a tanh-GELU MLP of width ``mlp_ratio · d``, a final LayerNorm,
and a head tied to the token embedding by default. Initialisation as GPT-2: weights N(0, 0.02²), biases 0, the two
residual projections of each block N(0, (0.02/√(2·n_layer))²). Seed with ``torch.manual_seed`` before building.

The model supports forward-mode AD (``torch.autograd.forward_ad`` dual tensors, ``torch.func.jvp``): fused CPU
attention kernels have no JVP rule, so attention falls back to PyTorch's math kernel when one is refused.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text import IGNORE_INDEX, Windows

__all__ = ["GPTConfig", "GPT_PRESETS", "gpt_config", "GPT", "lm_loss", "evaluate_lm"]


@dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT`: V, layers, heads, width d, context length T, dropout and the head tie."""

    vocab_size: int
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True
    mlp_ratio: int = 4
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        sizes = {"vocab_size": self.vocab_size, "n_layer": self.n_layer, "n_head": self.n_head,
                 "d_model": self.d_model, "seq_len": self.seq_len, "mlp_ratio": self.mlp_ratio}
        bad = [f"{name}={value}" for name, value in sizes.items() if value <= 0]
        if bad:
            raise ValueError(f"GPTConfig sizes must be positive: {', '.join(bad)}")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


GPT_PRESETS: dict[str, GPTConfig] = {
    "byte": GPTConfig(vocab_size=256, n_layer=2, n_head=4, d_model=64, seq_len=64),
    "bpe": GPTConfig(vocab_size=8192, n_layer=2, n_head=4, d_model=128, seq_len=128),
}
"""``byte``: UTF-8 bytes, 2 layers, d = 64, T = 64 (≈0.12 M parameters); ``bpe``: V = 8192, 2 layers, d = 128,
T = 128 (≈1.46 M parameters, 1.05 M of them the tied embedding)."""


def gpt_config(preset: str, **overrides: object) -> GPTConfig:
    """A named preset with fields replaced, e.g. ``gpt_config("bpe", vocab_size=text.vocab_size, dropout=0.1)``."""
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(GPT_PRESETS)}")
    return replace(GPT_PRESETS[preset], **overrides)


def _math_attention() -> contextlib.AbstractContextManager:
    """Select PyTorch's math attention kernel (the default CPU path on torch < 2.3, which has no selector)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _causal_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """softmax(q kᵀ/√d_h + causal mask) v on (B, H, T, d_h), retried on the math kernel if a fused one refuses."""
    try:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    except NotImplementedError:  # e.g. "forward AD with _scaled_dot_product_flash_attention_for_cpu"
        with _math_attention():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused qkv projection, attention, output projection, dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, d) → (B, T, d); position t attends to positions ≤ t only."""
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.n_head, width // self.n_head).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=-1))
        y = _causal_attention(q, k, v, self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class MLP(nn.Module):
    """d → mlp_ratio·d → GELU (tanh approximation, as GPT-2) → d, dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(…, d) → (…, d)."""
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN₁(x)), then + mlp(LN₂(·))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, d) → (B, T, d)."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Causal LM: ``model(input_ids)`` with int64 (B, T ≤ seq_len) ids → logits (B, T, V) predicting the next id."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.seq_len, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2: N(0, std²) weights, zero biases, residual projections N(0, (std/√(2·n_layer))²)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for projection in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(projection.weight, std=std / math.sqrt(2 * self.config.n_layer))

    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits (B, T, V): position t sees ids[:, :t+1] only."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len={self.config.seq_len}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.dropout(self.wte(input_ids) + self.wpe(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy −(1/N) Σ log softmax(z_bt)[y_bt] over the N labels ≠ ``ignore_index``
    (``reduction="sum"``: without the 1/N).

    ``logits`` (B, T, V) and ``labels`` (B, T) are aligned (labels already shifted, as the text module makes them).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}: "
                         "want (B, T, V) and (B, T)")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: Windows, batch_size: int = 32, ignore_index: int = IGNORE_INDEX) -> float:
    """Token-weighted mean validation loss over all labelled positions of ``windows`` (eval mode, no grad).

    The model's training mode is restored afterwards.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for inputs, labels in windows.batches(batch_size):
            inputs, labels = inputs.to(device), labels.to(device)
            total += lm_loss(model(inputs).float(), labels, ignore_index, reduction="sum").item()
            tokens += int((labels != ignore_index).sum())
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no labelled position to evaluate")
    return total / tokens
