"""Small classifiers for the lab, all taking flat digits (N, 64) and returning logits (N, n_classes).

Every model uses PyTorch's default initialisation (seed with ``torch.manual_seed`` before building).
Image models view the input as (N, 1, 8, 8) and the transformer as 8 row tokens of 8 features, so a
training loop can feed the same tensors to every architecture. ``build_model(name, **kw)`` is the
registry used by the CLI and the benchmarks.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DIGITS_SIDE, as_images, as_row_tokens

__all__ = [
    "Linear",
    "MLP",
    "MLPLayerNorm",
    "CNN",
    "CNNBatchNorm",
    "ResNetBatchNorm",
    "RowTransformer",
    "MODEL_NAMES",
    "build_model",
]

_PIXELS = DIGITS_SIDE * DIGITS_SIDE


class Linear(nn.Module):
    """Multinomial logistic regression z = W x + b."""

    def __init__(self, in_features: int = _PIXELS, n_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_features) → logits (N, n_classes)."""
        return self.fc(x)


class MLP(nn.Module):
    """z = W₂ ReLU(W₁ x + b₁) + b₂; 64→128→10 is the paper's lrspike model."""

    def __init__(self, in_features: int = _PIXELS, hidden: int = 128, n_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_features) → logits (N, n_classes)."""
        return self.net(x)


class MLPLayerNorm(nn.Module):
    """``blocks`` × [Linear, LayerNorm, GELU] (in→h, then h→h), then h→classes.

    The defaults (h = 128, 2 blocks) are the phase-transition MLP+LN; the reference's archgrid MLP+LN is
    h = 64 with 3 blocks.
    """

    def __init__(self, in_features: int = _PIXELS, hidden: int = 128, n_classes: int = 10, blocks: int = 2) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {blocks}")
        layers: list[nn.Module] = []
        for index in range(blocks):
            layers += [nn.Linear(in_features if index == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, n_classes))

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_features) → logits (N, n_classes)."""
        return self.net(x)


class CNN(nn.Module):
    """On 8×8 images: [Conv3×3 (pad 1), GELU, MaxPool2] × 2 → 2×2 maps → FC → GELU → FC.

    ``channels=(16, 32)`` is the paper's small CNN; ``channels=(100, 100)`` is the compute-bound benchmark variant.
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64, n_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.GELU(), nn.MaxPool2d(2),
        )
        pooled_side = DIGITS_SIDE // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * pooled_side * pooled_side, hidden), nn.GELU(), nn.Linear(hidden, n_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Flat digits (N, 64), viewed as (N, 1, 8, 8) → logits (N, n_classes)."""
        return self.head(self.features(as_images(x)))


class CNNBatchNorm(nn.Module):
    """The paper's CNN+BN (archgrid): the 64 pixels as a 1-D signal (N, 1, 64),
    [Conv1d k3 (pad 1), BatchNorm1d, ReLU] × 2, global average pool, Linear → classes.

    Treating the image as one row-major 1-D signal (not a 2-D image) follows the reference; the BatchNorm
    layers make train-mode and eval-mode outputs differ, which is the point of including it.
    """

    def __init__(self, in_features: int = _PIXELS, channels: int = 32, n_classes: int = 10) -> None:
        super().__init__()
        self.in_features = in_features
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=3, padding=1), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, padding=1), nn.BatchNorm1d(channels), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(),
        )
        self.head = nn.Linear(channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_features) viewed as (N, 1, in_features) → logits (N, n_classes)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected input of shape (N, {self.in_features}), got {tuple(x.shape)}")
        return self.head(self.features(x.unsqueeze(1)))


class _ResidualBlock(nn.Module):
    """relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)); the shortcut is a strided 1×1 conv + BN when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))

    def forward(self, x: Tensor) -> Tensor:
        """(N, c_in, H, W) → (N, c_out, H/stride, W/stride)."""
        return F.relu(self.body(x) + self.shortcut(x))


class ResNetBatchNorm(nn.Module):
    """A small ResNet-style CNN with BatchNorm on 8×8 digits (a CPU stand-in for the paper's ResNet-18).

    Stem Conv3×3(1→c₁) + BN + ReLU, a residual block at c₁ (8×8), a strided residual block to c₂ (4×4), global
    average pooling, Linear(c₂ → classes).
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), n_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.stem = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.blocks = nn.Sequential(_ResidualBlock(c1, c1, 1), _ResidualBlock(c1, c2, 2))
        self.head = nn.Linear(c2, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Flat digits (N, 64), viewed as (N, 1, 8, 8) → logits (N, n_classes)."""
        return self.head(self.blocks(self.stem(as_images(x))).mean(dim=(2, 3)))


class _SelfAttention(nn.Module):
    """Multi-head self-attention softmax(QKᵀ/√d_head) V over all tokens, then an output projection."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, d_model) → (N, T, d_model)."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(n, t, d))


class _PreNormBlock(nn.Module):
    """x ← x + Attn(LN(x)); x ← x + FFN(LN(x)) with FFN = Linear(d, m·d), GELU, Linear(m·d, d)."""

    def __init__(self, d_model: int, n_heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_attn = nn.LayerNorm(d_model)
        self.attn = _SelfAttention(d_model, n_heads)
        self.norm_ffn = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Linear(ffn_mult * d_model, d_model))

    def forward(self, x: Tensor) -> Tensor:
        """(N, T, d_model) → (N, T, d_model)."""
        x = x + self.attn(self.norm_attn(x))
        return x + self.ffn(self.norm_ffn(x))


class RowTransformer(nn.Module):
    """A pre-LN transformer over the 8 image rows as tokens (8 features each), mean-pooled into a linear head.

    embed Linear(8, d) + learned positions (8, d) → n_layers × [attention over the 8 tokens, FFN] → LayerNorm
    → mean over tokens → Linear(d, classes). Attention is real multi-token attention (unlike the reference's
    length-1 "transformer") and goes through ``F.scaled_dot_product_attention``.
    """

    def __init__(
        self, d_model: int = 32, n_heads: int = 2, n_layers: int = 1, ffn_mult: int = 4, n_classes: int = 10
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        self.embed = nn.Linear(DIGITS_SIDE, d_model)
        self.position = nn.Parameter(0.02 * torch.randn(DIGITS_SIDE, d_model))
        self.blocks = nn.Sequential(*(_PreNormBlock(d_model, n_heads, ffn_mult) for _ in range(n_layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Flat digits (N, 64), viewed as 8 row tokens (N, 8, 8) → logits (N, n_classes)."""
        tokens = self.embed(as_row_tokens(x)) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "linear": Linear,
    "mlp": MLP,
    "mlp-ln": MLPLayerNorm,
    "cnn": CNN,
    "cnn-bn": CNNBatchNorm,
    "resnet-bn": ResNetBatchNorm,
    "transformer": RowTransformer,
    # compute-bound benchmark configurations (tens of ms per batch-128 step on a 2-core CPU)
    "cnn-wide": lambda **kw: CNN(**{"channels": (100, 100), "hidden": 128, **kw}),
    "transformer-deep": lambda **kw: RowTransformer(**{"d_model": 128, "n_heads": 4, "n_layers": 3, **kw}),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def build_model(name: str, **kwargs: object) -> nn.Module:
    """A freshly initialised model from the registry (names: ``MODEL_NAMES``); kwargs go to its constructor."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name](**kwargs)
