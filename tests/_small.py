"""A small classification problem shared by the step tests: Gaussian inputs of 8 features and a tanh MLP."""
import torch
from torch import nn


def small_data(n, k, seed=0):
    """(x, y): n standard-normal rows of 8 features and n labels in [0, k)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, k, (n,), generator=g)


def small_mlp(k, seed=0):
    """8 → 16 (tanh) → k, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, k))
