"""Independent references for the lab tests: no safestep probe, bound or geometry function is used here.

ρ_a = π / max_x (max_k a_k − min_k a_k) with the slopes a = dz/dτ of the logits along a unit direction taken by
central finite differences of a float64 copy of the model, and the first step of Adam and of SGD + momentum
written out from their update rules.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Direction = dict[str, Tensor]


def _unit(vectors: Direction) -> Direction:
    norm = math.sqrt(sum(float((v.double() ** 2).sum()) for v in vectors.values()))
    return {name: v / norm for name, v in vectors.items()}


def gradient(model: nn.Module, x: Tensor, y: Tensor, train_mode: bool = True) -> Direction:
    """∇ mean CE of a copy of ``model`` (train or eval mode) at its current parameters."""
    twin = copy.deepcopy(model).train(train_mode)
    loss = F.cross_entropy(twin(x), y)
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    return {name: g.detach() for (name, _), g in zip(twin.named_parameters(), grads)}


def first_adam_direction(model: nn.Module, x: Tensor, y: Tensor, eps: float = 1e-8, train_mode: bool = True) -> Direction:
    """Unit direction of Adam's first step: m̂ = g, v̂ = g², Δθ ∝ −g/(|g| + ε)."""
    return _unit({name: -g / (g.abs() + eps) for name, g in gradient(model, x, y, train_mode).items()})


def first_sgd_direction(model: nn.Module, x: Tensor, y: Tensor, weight_decay: float) -> Direction:
    """Unit direction of SGD + momentum's first step: the buffer is g + wd·θ, Δθ ∝ −(g + wd·θ)."""
    params = dict(model.named_parameters())
    return _unit({name: -(g + weight_decay * params[name].detach()) for name, g in gradient(model, x, y).items()})


@torch.no_grad()
def fd_radius(model: nn.Module, direction: Direction, x: Tensor, train_mode: bool = False, h: float = 1e-5) -> float:
    """π / max_x spread of (z(θ + h v) − z(θ − h v)) / 2h, in float64 (train mode: batch statistics of x)."""
    twin = copy.deepcopy(model).double().train(train_mode)
    params = dict(twin.named_parameters())
    theta = {name: p.clone() for name, p in params.items()}

    def logits(t: float) -> Tensor:
        for name, p in params.items():
            p.copy_(theta[name] + t * direction[name].double())
        return twin(x.double())

    slopes = (logits(h) - logits(-h)) / (2 * h)
    spread = slopes.max(dim=1).values - slopes.min(dim=1).values
    return math.pi / float(spread.max())
