"""Bundled classification datasets as train/test tensors (no downloads; scikit-learn imported lazily).

Digits (sklearn ``load_digits``): 1797 8x8 images, 10 classes, pixel values 0..16 scaled by 1/16 into [0, 1].
Wine and breast cancer: features standardised with the training split's mean and standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Split",
    "split_indices",
    "load_digits_split",
    "load_tabular_split",
    "as_images",
    "as_row_tokens",
    "DIGITS_SIDE",
]

DIGITS_SIDE = 8
_TABULAR_LOADERS = {"wine": "load_wine", "breast_cancer": "load_breast_cancer"}


@dataclass(frozen=True)
class Split:
    """A train/test split: ``x_*`` float32 (N, D), ``y_*`` int64 (N,) class indices in [0, n_classes)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        """D, the number of input features per sample."""
        return int(self.x_train.shape[1])


def split_indices(labels: np.ndarray, test_fraction: float, seed: int, stratified: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Test set = round(f·n_c) random samples of each class c (stratified) or round(f·N) overall; returns (train, test).

    Both index arrays are sorted, so the split depends only on (labels, test_fraction, seed, stratified).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if stratified:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        test = np.concatenate([rng.permutation(g)[: int(round(test_fraction * len(g)))] for g in groups])
    else:
        test = rng.permutation(len(labels))[: int(round(test_fraction * len(labels)))]
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test] = True
    if is_test.all() or not is_test.any():
        raise ValueError(f"test_fraction={test_fraction} leaves an empty train or test set for {len(labels)} samples")
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _make_split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, stratified: bool) -> Split:
    train, test = split_indices(y, test_fraction, seed, stratified)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    train_t, test_t = torch.as_tensor(train), torch.as_tensor(test)
    return Split(xt[train_t], yt[train_t], xt[test_t], yt[test_t], n_classes=int(y.max()) + 1)


def load_digits_split(test_fraction: float = 0.2, seed: int = 0, stratified: bool = True) -> Split:
    """Digits X/16 ∈ [0,1]^(N×64), y ∈ {0..9}; default split: 1438 train / 359 test (36±1 test images per class)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    return _make_split(x, bunch.target.astype(np.int64), test_fraction, seed, stratified)


def load_tabular_split(name: str, test_fraction: float = 0.2, seed: int = 0, stratified: bool = True) -> Split:
    """Wine or breast cancer with x ← (x − μ_train)/σ_train (σ = 0 features left unscaled)."""
    if name not in _TABULAR_LOADERS:
        raise ValueError(f"unknown tabular dataset {name!r}; choose one of {sorted(_TABULAR_LOADERS)}")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, _TABULAR_LOADERS[name])()
    raw = _make_split(bunch.data.astype(np.float32), bunch.target.astype(np.int64), test_fraction, seed, stratified)
    mean = raw.x_train.mean(dim=0)
    std = raw.x_train.std(dim=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return Split((raw.x_train - mean) / std, raw.y_train, (raw.x_test - mean) / std, raw.y_test, raw.n_classes)


def _check_flat_digits(x: Tensor) -> None:
    if x.ndim != 2 or x.shape[1] != DIGITS_SIDE * DIGITS_SIDE:
        raise ValueError(f"expected flat digits of shape (N, {DIGITS_SIDE * DIGITS_SIDE}), got {tuple(x.shape)}")


def as_images(x: Tensor) -> Tensor:
    """(N, 64) → (N, 1, 8, 8): one-channel 8×8 images, row-major as sklearn stores them."""
    _check_flat_digits(x)
    return x.reshape(-1, 1, DIGITS_SIDE, DIGITS_SIDE)


def as_row_tokens(x: Tensor) -> Tensor:
    """(N, 64) → (N, 8, 8): a sequence of 8 tokens (image rows), each with 8 features (pixels)."""
    _check_flat_digits(x)
    return x.reshape(-1, DIGITS_SIDE, DIGITS_SIDE)
