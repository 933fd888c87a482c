"""The models the benchmarks measure, each with its batches, its loss and how SafeStep sees it.

Classifiers train on scikit-learn's digits (batch 128). ``gpt2-*`` are GPT-2s built from a config with Hugging Face
``transformers`` (no weights downloaded; skipped when it is not installed) on random token ids (timing only),
batch 16; their ``labels`` follow the Hugging Face convention (the model shifts them), so the guard's per-row labels
are the ids shifted left with -100 at the last position. ``text-gpt-*`` are the lab's GPT on real text (the Python
standard library's sources, tokenized once and cached), for measurements where the data matters.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from safestep_lab.data import load_digits_split
from safestep_lab.models import build_model
from safestep_lab.report import replace_block

__all__ = ["Workload", "WORKLOADS", "workload", "available", "update_block"]

BATCH_CLASSIFIER = 128
BATCH_LM = 16


@dataclass
class Workload:
    """A model factory, batch ``i`` as (inputs, targets), the training loss, and SafeStep's view of the model."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[Any, Tensor]]
    loss: Callable[[nn.Module, Any, Tensor], Tensor]
    guard_options: dict[str, Any]
    lr: float

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, i: int) -> None:
        """zero_grad, forward, loss, backward and the optimizer step on batch ``i``."""
        inputs, targets = self.batch(i)
        optimizer.zero_grad(set_to_none=True)
        self.loss(model, inputs, targets).backward()
        optimizer.step()


def _digits(i: int, _cache: dict[str, Any] = {}) -> tuple[Tensor, Tensor]:  # noqa: B006 -- a module-level cache
    if "split" not in _cache:
        _cache["split"] = load_digits_split()
    split = _cache["split"]
    batches = split.x_train.shape[0] // BATCH_CLASSIFIER
    start = (i % batches) * BATCH_CLASSIFIER
    return split.x_train[start:start + BATCH_CLASSIFIER], split.y_train[start:start + BATCH_CLASSIFIER]


def _classifier(name: str, description: str, **kwargs: Any) -> Workload:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return build_model(name, **kwargs)

    return Workload(name=description.split(",")[0], description=description, build=build, batch=_digits,
                    loss=lambda model, x, y: F.cross_entropy(model(x), y), guard_options={}, lr=1e-3)


def _shifted_labels(batch: dict[str, Tensor]) -> Tensor:
    """The per-row labels of a Hugging Face causal LM batch: position t predicts labels[t + 1]; the last, nothing."""
    labels = batch["labels"]
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def _gpt2(d_model: int, vocab: int, seq_len: int, description: str) -> Workload:
    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        config = GPT2Config(n_layer=2, n_embd=d_model, n_head=4, vocab_size=vocab, n_positions=seq_len,
                            bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout, as LMs pretrain
        return GPT2LMHeadModel(config)

    def batch(i: int) -> tuple[dict[str, Tensor], Tensor]:
        ids = torch.randint(0, vocab, (BATCH_LM, seq_len), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}, ids

    return Workload(
        name=description.split(",")[0], description=description, build=build, batch=batch,
        loss=lambda model, inputs, _: model(**inputs).loss,
        guard_options={"logits_fn": lambda model, b: model(input_ids=b["input_ids"]).logits,
                       "labels_fn": _shifted_labels},
        lr=3e-3)


def _text_gpt(preset: str, description: str) -> Workload:
    """The lab's GPT on the Python standard library's sources (tokenized once, cached), batch 16 windows."""
    from safestep_lab.lm import GPT, gpt_config, lm_loss
    from safestep_lab.text import stdlib_corpus, tokenize_corpus

    text = tokenize_corpus(stdlib_corpus(max_bytes=4_000_000), "byte" if preset == "byte" else "bpe")
    config = gpt_config(preset, vocab_size=text.vocab_size)
    sampler = text.sampler(batch_size=BATCH_LM, seq_len=config.seq_len, seed=0)
    current: dict[str, Tensor] = {}

    def build() -> nn.Module:
        torch.manual_seed(0)
        return GPT(config)

    def batch(i: int) -> tuple[Tensor, Tensor]:
        inputs, labels = sampler.batch(i)
        current["labels"] = labels  # the guard's labels_fn reads the batch's labels from here
        return inputs, labels

    return Workload(name=description.split(",")[0], description=description, build=build, batch=batch,
                    loss=lambda model, x, y: lm_loss(model(x), y),
                    guard_options={"labels_fn": lambda _: current["labels"]}, lr=3e-3)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "mlp": lambda: _classifier("mlp", "mlp, 64-128-10 ReLU, digits batch 128"),
    "row-transformer": lambda: _classifier("transformer", "row-transformer, 1 pre-LN layer d=32 over the 8 image rows"),
    "cnn-48-96": lambda: _classifier("cnn", "cnn-48-96, 2 conv layers of 48/96 channels", channels=(48, 96)),
    "transformer-3x128": lambda: _classifier("transformer-deep", "transformer-3x128, 3 pre-LN layers d=128"),
    "gpt2-d128-v8192": lambda: _gpt2(128, 8192, 128, "gpt2-d128-v8192, 2 layers, 16 x 128 tokens"),
    "gpt2-d64-v2000": lambda: _gpt2(64, 2000, 64, "gpt2-d64-v2000, 2 layers, 16 x 64 tokens"),
    "text-gpt-byte": lambda: _text_gpt("byte", "text-gpt-byte, lab GPT d=64 on stdlib bytes, 16 x 64"),
    "text-gpt-bpe": lambda: _text_gpt("bpe", "text-gpt-bpe, lab GPT d=128 on stdlib BPE-8192, 16 x 128"),
}
LANGUAGE_MODELS = ("gpt2-d128-v8192", "gpt2-d64-v2000")


def available(name: str) -> bool:
    """False for the language models when ``transformers`` is not installed."""
    if name.startswith("text-"):
        return importlib.util.find_spec("tokenizers") is not None or name.endswith("byte")
    return name not in LANGUAGE_MODELS or importlib.util.find_spec("transformers") is not None


def workload(name: str) -> Workload:
    """The workload called ``name`` (ValueError naming the known ones otherwise)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()


def update_block(path: Path, name: str, text: str) -> None:
    """Replace the lines between the file's ``<!-- {name}:start ... -->`` and ``<!-- {name}:end -->`` with ``text``."""
    path.write_text(replace_block(path.read_text(encoding="utf-8"), text, name), encoding="utf-8")
