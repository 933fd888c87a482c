"""Evaluating trained lab models, BatchNorm included.

A BatchNorm network has three test-time functions: eval mode with the running statistics accumulated during
training (stale after a large step: they average the statistics of networks that no longer exist), train mode
on the test batch (the reference code's choice: the test batch normalises itself) and eval mode with the
running statistics recalibrated on the training split (the population statistics of the current weights,
what a deployed network uses). The lab reports the recalibrated number; the other two are kept beside it.
Every function here leaves the model it is given untouched unless its name says otherwise.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import Split

__all__ = ["has_batch_norm", "recalibrate_batch_norm", "accuracy_and_loss", "recalibrated_metrics",
           "train_mode_metrics"]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batch_norm(model: nn.Module) -> bool:
    """Whether the model has a batch norm that tracks running statistics."""
    return bool(_batch_norms(model))


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, x: Tensor) -> None:
    """Set every batch norm's running mean/variance to the statistics of ``x`` (one train-mode pass, cumulative)."""
    norms = _batch_norms(model)
    if not norms:
        return
    was_training = model.training
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)


def accuracy_and_loss(logits: Tensor, y: Tensor) -> tuple[float, float]:
    """(accuracy, mean CE); a row whose logits are not all finite counts as misclassified."""
    correct = (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)
    return float(correct.float().mean()), float(F.cross_entropy(logits, y))


@torch.no_grad()
def recalibrated_metrics(model: nn.Module, data: Split) -> tuple[float, float]:
    """(test accuracy, test CE) in eval mode after recalibrating a copy's batch norms on the training split."""
    probe = copy.deepcopy(model)
    recalibrate_batch_norm(probe, data.x_train)
    return accuracy_and_loss(probe.eval()(data.x_test), data.y_test)


@torch.no_grad()
def train_mode_metrics(model: nn.Module, data: Split) -> tuple[float, float, float]:
    """(test accuracy, test CE, train CE) of the train-mode function (batch statistics); running stats untouched."""
    probe = copy.deepcopy(model).train()
    return (*accuracy_and_loss(probe(data.x_test), data.y_test),
            float(F.cross_entropy(probe(data.x_train), data.y_train)))
