"""Calibration targets of docs/calibrate.md: the demo's two digits models and the byte-level GPT of the LM demo.

    safestep calibrate docs/calibrate_targets.py:mlp_layernorm
    safestep calibrate docs/calibrate_targets.py:row_transformer
    safestep calibrate docs/calibrate_targets.py:byte_gpt

Each function returns a ``CalibrationTarget``: the model, its optimizer and ``train_step(optimizer)``, one step of the
training loop as the demos run it (no LR spike: calibrate measures calm training). The models and data come from
the reproduction lab (``pip install -e lab``); the library itself never imports it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

from safestep.calibrate import CalibrationTarget


def _lab(module: str) -> ModuleType:
    """A module of the reproduction lab, wherever it is installed (``safestep_lab`` or, before the move, ``safestep.lab``)."""
    try:
        return importlib.import_module(f"safestep_lab.{module}")
    except ModuleNotFoundError:
        return importlib.import_module(f"safestep.lab.{module}")


def _digits(model_name: str, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> CalibrationTarget:
    """The demo's setting: digits, Adam at lr 1e-3, batches of 64 drawn from a seeded generator."""
    data = _lab("data").load_digits_split(seed=seed)
    torch.manual_seed(seed)
    model = _lab("models").build_model(model_name)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def train_step(opt: torch.optim.Optimizer) -> None:
        rows = torch.randint(0, len(data.y_train), (batch_size,), generator=generator)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(data.x_train[rows]), data.y_train[rows]).backward()
        opt.step()

    return CalibrationTarget(model, optimizer, train_step)


def mlp_layernorm() -> CalibrationTarget:
    """The demo's MLP+LayerNorm."""
    return _digits("mlp-ln")


def row_transformer() -> CalibrationTarget:
    """The demo's row-token transformer."""
    return _digits("transformer")


def byte_gpt(lr: float = 3e-3, seed: int = 0) -> CalibrationTarget:
    """The LM demo's byte-level GPT (2 layers, d = 64, T = 64) on Python standard-library sources: AdamW at 3e-3,
    weight decay 0.01, batches of 16 windows of 64 bytes."""
    common = _lab("experiments.lm_common")
    setup = common.LMSetup()
    model = common.build_model(setup, seed)
    sampler = common.load_text(setup.tokenizer).sampler(setup.batch_size, setup.seq_len, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=setup.weight_decay)
    step = iter(range(10**9))

    def train_step(opt: torch.optim.Optimizer) -> None:
        inputs, labels = sampler.batch(next(step))
        opt.zero_grad(set_to_none=True)
        _lab("lm").lm_loss(model(inputs), labels).backward()
        opt.step()

    return CalibrationTarget(model, optimizer, train_step)
