"""Real text offline: corpora, tokenizers, a content-addressed cache, and next-token batches.

* **Corpus.** :func:`stdlib_corpus` reads the ``.py`` sources of the running interpreter's standard library (every
  Python installation ships them, so no download is needed); :func:`files_corpus` reads a user's own text files.
  Files are taken whole in a fixed hash order of their relative paths until ``max_bytes`` (the file crossing the cap
  is cut at a line end), then split train/validation **by file**: a file is validation iff
  ``sha256("split:" + relative path)`` read as a fraction of 2⁶⁴ is below ``val_fraction``.
* **Tokenizer.** :class:`ByteTokenizer` (V = 256, UTF-8 bytes, no training) or a byte-level BPE trained locally with
  the ``tokenizers`` package on the training files only (:func:`train_bpe`). Every document is followed by an
  end-of-text id (BPE: the special token ``<|endoftext|>``; bytes: 0, the NUL byte, which text files do not contain).
* **Cache.** :func:`tokenize_corpus` stores tokenizer and token ids in one file ``<cache>/text/<key>.pt``, ``key`` =
  sha256 of (cache format, the corpus content hash, the tokenizer settings and the ``tokenizers`` version). Writes are
  atomic (temporary file, then rename); an unreadable or inconsistent entry is rebuilt.
* **Batches.** Label convention: inputs and labels are both (B, T) int64 and already shifted,
  ``inputs[b, t] = ids[s_b + t]``, ``labels[b, t] = ids[s_b + t + 1]``, so ``cross_entropy(logits[b, t], labels[b, t])``
  needs no further shift. Positions past the end of the stream carry ``pad_id`` in the inputs and -100 in the labels.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import count
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from safestep.bounds import IGNORE_INDEX

from .io import write_atomically

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_VOCAB_SIZE",
    "IGNORE_INDEX",
    "EOS_TOKEN",
    "Progress",
    "Corpus",
    "stdlib_corpus",
    "files_corpus",
    "Tokenizer",
    "ByteTokenizer",
    "BPETokenizer",
    "train_bpe",
    "cache_root",
    "TokenizedText",
    "tokenize_corpus",
    "Windows",
    "make_windows",
    "WindowSampler",
]

DEFAULT_MAX_BYTES = 16 * 2**20
DEFAULT_VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"
_BYTE_EOS = 0
_CACHE_FORMAT = 1
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
_PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"
_ENCODE_CHUNK = 64  # documents per encode call between two progress reports

Progress = Callable[[str], None]
"""Receives one human-readable line per stage (library code never prints)."""


def _silent(_message: str) -> None:
    """The default progress callback: ignore."""


# ----------------------------------------------------------------------------------------------------------- corpus


@dataclass(frozen=True)
class Corpus:
    """Documents (relative posix name, text) in name order, each marked train or validation; ``meta``: provenance."""

    names: tuple[str, ...]
    texts: tuple[str, ...]
    is_val: tuple[bool, ...]
    meta: dict[str, Any] = field(compare=False)

    def texts_of(self, split: str) -> list[str]:
        """The texts of ``split`` ("train" or "val"), in name order."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        want_val = split == "val"
        return [text for text, val in zip(self.texts, self.is_val) if val == want_val]

    @cached_property
    def content_hash(self) -> str:
        """sha256 over every (name, split, text): equal hashes mean identical documents and split."""
        digest = hashlib.sha256()
        for name, text, val in zip(self.names, self.texts, self.is_val):
            for part in (name.encode(), b"v" if val else b"t", text.encode()):
                digest.update(len(part).to_bytes(8, "little"))
                digest.update(part)
        return digest.hexdigest()


def _unit_hash(tag: str, name: str) -> float:
    """A fixed pseudo-random number in [0, 1) per (tag, name): the first 8 bytes of sha256(tag:name) / 2⁶⁴."""
    return int.from_bytes(hashlib.sha256(f"{tag}:{name}".encode()).digest()[:8], "big") / 2.0**64


def _read_text(path: Path, encoding: str, skip_undecodable: bool) -> str | None:
    """The text of ``path``; None if it does not decode and ``skip_undecodable``, else ValueError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        if skip_undecodable:
            return None
        raise ValueError(f"{path} is not valid {encoding} text ({exc.reason} at byte {exc.start})") from exc


def _collect(files: Sequence[Path], names: Sequence[str], max_bytes: int | None, encoding: str,
             skip_undecodable: bool) -> tuple[list[tuple[str, str]], str | None, list[str]]:
    """Read files in hash order of their names, keeping whole non-blank texts while their UTF-8 size fits in
    ``max_bytes``; the first that does not fit is cut after its last complete line within the cap and ends the pass.

    Returns the kept (name, text) in name order, the name of the cut file, and the names skipped as undecodable.
    Files past the cap are not read. A larger cap keeps a superset of a smaller cap's files: a sample across the
    whole source, not its alphabetical beginning.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    kept, undecodable, used, cut = [], [], 0, None
    for name, path in sorted(zip(names, files), key=lambda item: (_unit_hash("order", item[0]), item[0])):
        text = _read_text(path, encoding, skip_undecodable)
        if text is None:
            undecodable.append(name)
            continue
        if not text.strip():
            continue
        data = text.encode()
        if max_bytes is not None and len(data) > max_bytes - used:
            end = data.rfind(b"\n", 0, max_bytes - used) + 1
            if end:
                kept.append((name, data[:end].decode()))
                cut = name
            break
        kept.append((name, text))
        used += len(data)
    return sorted(kept), cut, sorted(undecodable)


def _split_by_file(names: Sequence[str], val_fraction: float) -> list[bool]:
    """is_val per name: ``_unit_hash("split", name) < val_fraction``, moved so that both sides are non-empty."""
    scores = [_unit_hash("split", name) for name in names]
    is_val = [s < val_fraction for s in scores]
    if val_fraction == 0.0:
        return is_val
    if len(names) < 2:
        raise ValueError(f"a by-file split needs at least two files, got {len(names)} (or pass val_fraction=0)")
    if not any(is_val):
        is_val[int(np.argmin(scores))] = True
    if all(is_val):
        is_val[int(np.argmax(scores))] = False
    return is_val


def _build_corpus(files: Sequence[Path], names: Sequence[str], max_bytes: int | None, val_fraction: float,
                  encoding: str, skip_undecodable: bool, meta: dict[str, Any]) -> Corpus:
    """Read within the cap, split by file and describe; raises when no file with text is left."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    kept, cut, undecodable = _collect(files, names, max_bytes, encoding, skip_undecodable)
    if not kept:
        raise ValueError(f"empty corpus: no file with text among {len(names)} ({meta['source']})")
    kept_names = tuple(name for name, _ in kept)
    texts = tuple(text for _, text in kept)
    is_val = tuple(_split_by_file(kept_names, val_fraction))
    sizes = [len(text.encode()) for text in texts]
    val_bytes = sum(size for size, val in zip(sizes, is_val) if val)
    meta = dict(meta, max_bytes=max_bytes, val_fraction=val_fraction, truncated=cut, undecodable=undecodable,
                files=len(texts), bytes=sum(sizes), train_files=is_val.count(False), val_files=is_val.count(True),
                train_bytes=sum(sizes) - val_bytes, val_bytes=val_bytes)
    return Corpus(kept_names, texts, is_val, meta)


def _stdlib_files(root: Path, excluded: frozenset[str]) -> list[Path]:
    """Every ``.py`` file under ``root``, not descending into directories named in ``excluded``, sorted."""
    found = []
    for directory, subdirs, filenames in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        found.extend(Path(directory, f) for f in filenames if f.endswith(".py"))
    return sorted(found)


def stdlib_corpus(max_bytes: int | None = DEFAULT_MAX_BYTES, val_fraction: float = 0.1,
                  include_tests: bool = False) -> Corpus:
    """The ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` of the running interpreter.

    Third-party packages (``site-packages``/``dist-packages``) are always excluded: they differ per environment.
    Test suites (directories ``test``, ``tests``, ``idle_test``) are excluded by default: distributions ship them
    optionally (Debian's ``libpython3.X-testsuite``, a Windows installer option), so including them would make the
    corpus depend on packaging rather than on the Python version; they also hold deliberately malformed and
    non-UTF-8 files. Files that are not UTF-8 are skipped and listed in ``meta["undecodable"]``. The corpus differs
    between Python versions; ``meta`` records the version and paths that produced it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_files(root, _THIRD_PARTY_DIRS if include_tests else _THIRD_PARTY_DIRS | _TEST_DIRS)
    meta = {"source": "stdlib", "python": platform.python_version(), "implementation": sys.implementation.name,
            "stdlib": str(root), "include_tests": include_tests}
    names = [p.relative_to(root).as_posix() for p in files]
    return _build_corpus(files, names, max_bytes, val_fraction, "utf-8", True, meta)


def _user_files(source: str | os.PathLike | Iterable[str | os.PathLike], pattern: str) -> tuple[list[Path], Path]:
    """The files named by ``source`` (a directory globbed with ``pattern``, one file, or several) and their root."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.glob(pattern) if p.is_file())
            if not files:
                raise ValueError(f"no file in {path} matches {pattern!r}")
            return files, path
        sources = [path]
    else:
        sources = [Path(p) for p in source]
    if not sources:
        raise ValueError("no files given")
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise ValueError(f"not a file: {', '.join(missing[:3])}")
    files = sorted({p.resolve() for p in sources})
    return files, Path(os.path.commonpath([p.parent for p in files]))


def files_corpus(source: str | os.PathLike | Iterable[str | os.PathLike], pattern: str = "**/*.txt", *,
                 max_bytes: int | None = None, val_fraction: float = 0.1, encoding: str = "utf-8") -> Corpus:
    """A user's text files: a directory (with a glob ``pattern``), one file, or a list of files.

    Names are paths relative to the directory (or to the files' common parent), so the split does not depend on
    where the files live. A file that cannot be read or decoded (among those read: files past the cap are not)
    raises ``ValueError`` naming it.
    """
    files, root = _user_files(source, pattern)
    names = [p.relative_to(root).as_posix() for p in files]
    meta = {"source": "files", "root": str(root), "encoding": encoding}
    return _build_corpus(files, names, max_bytes, val_fraction, encoding, False, meta)


# ------------------------------------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the data module needs from a tokenizer."""

    kind: str
    eos_id: int

    @property
    def vocab_size(self) -> int:
        """V: ids lie in [0, V)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no end-of-text id appended)."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; ``decode(encode(text)) == text``."""

    def encode_documents(self, texts: Sequence[str], progress: Progress = _silent) -> Tensor:
        """One int64 stream: each document's ids followed by ``eos_id``."""


class ByteTokenizer:
    """UTF-8 bytes as ids, V = 256, end-of-text = 0 (the NUL byte)."""

    kind = "byte"
    eos_id = _BYTE_EOS

    @property
    def vocab_size(self) -> int:
        """V = 256."""
        return 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 decode of ``bytes(ids)``; an incomplete character becomes U+FFFD."""
        return bytes(ids).decode(errors="replace")

    def encode_documents(self, texts: Sequence[str], progress: Progress = _silent) -> Tensor:
        """Each document's bytes followed by 0, as one int64 stream."""
        data = bytearray(b"".join(text.encode() + bytes([self.eos_id]) for text in texts))
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64) if data else torch.zeros(0, dtype=torch.int64)


def _import_tokenizers() -> Any:
    """The ``tokenizers`` package, or ImportError saying how to install it."""
    try:
        import tokenizers
    except ImportError as exc:
        raise ImportError("BPE needs the tokenizers package (a dependency of the lab): pip install tokenizers") from exc
    return tokenizers


@contextlib.contextmanager
def _tokenizers_parallelism(enabled: bool) -> Iterator[None]:
    """Set ``TOKENIZERS_PARALLELISM`` for the block and restore it (process-wide: not safe across Python threads)."""
    previous = os.environ.get(_PARALLELISM_ENV)
    os.environ[_PARALLELISM_ENV] = "true" if enabled else "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_PARALLELISM_ENV, None)
        else:
            os.environ[_PARALLELISM_ENV] = previous


class BPETokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` (lossless on any text); ``backend`` is the underlying object.

    ``parallel=False`` (default) runs ``tokenizers`` on one thread (its ``TOKENIZERS_PARALLELISM`` is set to false
    during each call and restored); true lets it use all cores. Results are identical either way.
    """

    kind = "bpe"

    def __init__(self, backend: Any, parallel: bool = False) -> None:
        self.backend = backend
        self.parallel = parallel
        eos = backend.token_to_id(EOS_TOKEN)
        if eos is None:
            raise ValueError(f"the tokenizer has no {EOS_TOKEN} token")
        self.eos_id = int(eos)

    @classmethod
    def from_json(cls, text: str, parallel: bool = False) -> BPETokenizer:
        """Rebuild from ``to_json()`` output."""
        return cls(_import_tokenizers().Tokenizer.from_str(text), parallel)

    def to_json(self) -> str:
        """The full tokenizer (model, merges, pre-tokenizer, decoder) as the ``tokenizers`` JSON format."""
        return self.backend.to_str()

    @property
    def vocab_size(self) -> int:
        """V including the end-of-text token (may be below the requested size on a tiny corpus)."""
        return int(self.backend.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``."""
        with _tokenizers_parallelism(self.parallel):
            return list(self.backend.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; the end-of-text id decodes to ``<|endoftext|>``."""
        with _tokenizers_parallelism(self.parallel):
            return self.backend.decode(list(ids), skip_special_tokens=False)

    def encode_documents(self, texts: Sequence[str], progress: Progress = _silent) -> Tensor:
        """Each document's ids followed by ``eos_id``, as one int64 stream; progress every 64 documents."""
        ids: list[int] = []
        with _tokenizers_parallelism(self.parallel):
            for start in range(0, len(texts), _ENCODE_CHUNK):
                for encoding in self.backend.encode_batch(list(texts[start:start + _ENCODE_CHUNK])):
                    ids.extend(encoding.ids)
                    ids.append(self.eos_id)
                progress(f"encoded {min(start + _ENCODE_CHUNK, len(texts))}/{len(texts)} documents")
        return torch.tensor(ids, dtype=torch.int64)


def train_bpe(texts: Sequence[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2,
              parallel: bool = False) -> BPETokenizer:
    """Train a byte-level BPE on ``texts``: 256 byte symbols + ``<|endoftext|>`` + merges up to ``vocab_size``.

    Deterministic: ``tokenizers`` breaks ties between equally frequent pairs by pair id, so the same texts give the
    same vocabulary and merges, with or without ``parallel``.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size must be at least 257 (256 byte symbols + {EOS_TOKEN}), got {vocab_size}")
    if not any(text.strip() for text in texts):
        raise ValueError("cannot train a tokenizer on an empty corpus")
    tk = _import_tokenizers()
    backend = tk.Tokenizer(tk.models.BPE())
    backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                     special_tokens=[EOS_TOKEN],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    with _tokenizers_parallelism(parallel):
        backend.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    return BPETokenizer(backend, parallel)


# ------------------------------------------------------------------------------------------------------------ cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$SAFESTEP_CACHE``, else ``$XDG_CACHE_HOME/safestep``, else ``~/.cache/safestep``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SAFESTEP_CACHE"):
        return Path(os.environ["SAFESTEP_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "safestep"


def _tokenizer_settings(kind: str, vocab_size: int | None, min_frequency: int) -> dict[str, Any]:
    """The settings that determine the tokenizer (part of the cache key); validates ``kind`` and ``vocab_size``."""
    if kind == "byte":
        if vocab_size not in (None, 256):
            raise ValueError(f"the byte tokenizer has vocab_size 256, got {vocab_size}")
        return {"kind": "byte"}
    if kind == "bpe":
        return {"kind": "bpe", "vocab_size": DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size,
                "min_frequency": min_frequency, "tokenizers": _import_tokenizers().__version__}
    raise ValueError(f"tokenizer must be 'bpe' or 'byte', got {kind!r}")


def _cache_key(corpus: Corpus, settings: dict[str, Any]) -> str:
    """sha256 of the cache format, the corpus content hash and the tokenizer settings."""
    payload = {"format": _CACHE_FORMAT, "corpus": corpus.content_hash, "tokenizer": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _storage_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer dtype that holds ids in [0, vocab_size)."""
    return torch.uint8 if vocab_size <= 256 else torch.int16 if vocab_size <= 2**15 else torch.int32


def _write_entry(path: Path, key: str, tokenizer: Tokenizer, train_ids: Tensor, val_ids: Tensor) -> None:
    """Atomically save tokenizer and ids (narrow dtype) as one torch file."""
    dtype = _storage_dtype(tokenizer.vocab_size)
    entry = {"format": _CACHE_FORMAT, "key": key, "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
             "tokenizer": tokenizer.to_json() if isinstance(tokenizer, BPETokenizer) else "",
             "train_ids": train_ids.to(dtype), "val_ids": val_ids.to(dtype)}
    write_atomically(path, lambda handle: torch.save(entry, handle))


def _read_entry(path: Path, key: str, parallel: bool) -> tuple[Tokenizer, Tensor, Tensor] | None:
    """(tokenizer, train ids, val ids) from a cache file, or None when it is unreadable or inconsistent."""
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(entry, dict) and entry.get("format") == _CACHE_FORMAT and entry.get("key") == key):
            return None
        tokenizer: Tokenizer = (BPETokenizer.from_json(entry["tokenizer"], parallel) if entry["kind"] == "bpe"
                                else ByteTokenizer())
        ids = [entry[name].to(torch.int64) for name in ("train_ids", "val_ids")]
    except Exception:  # a torn or foreign file can fail in any of torch/zip/pickle/tokenizers: rebuild it
        return None
    vocab = tokenizer.vocab_size
    in_range = all(t.ndim == 1 and (t.numel() == 0 or (t.min() >= 0 and t.max() < vocab)) for t in ids)
    if vocab != entry["vocab_size"] or not in_range:
        return None
    return tokenizer, ids[0], ids[1]


# ---------------------------------------------------------------------------------------------------------- batches


@dataclass(frozen=True, eq=False)  # tensors have no truth value: compare by identity
class Windows:
    """A fixed set of windows: ``inputs`` and ``labels`` int64 (N, T), labels shifted by one, -100 where padded."""

    inputs: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(inputs, labels) of consecutive windows, ``batch_size`` at a time (the last batch may be smaller)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.inputs[start:start + batch_size], self.labels[start:start + batch_size]


def _as_stream(ids: Tensor, min_length: int) -> Tensor:
    """``ids`` as a 1-D int64 tensor of at least ``min_length`` tokens."""
    ids = torch.as_tensor(ids)
    if ids.ndim != 1 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"ids must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() < min_length:
        raise ValueError(f"need at least {min_length} tokens, got {ids.numel()}")
    return ids.to(torch.int64)


def _gather(ids: Tensor, starts: Tensor, seq_len: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """inputs[b, t] = ids[s_b + t], labels[b, t] = ids[s_b + t + 1]; past the end: pad_id / -100."""
    index = starts[:, None] + torch.arange(seq_len + 1)
    valid = index < ids.numel()
    chunk = ids[index.clamp(max=ids.numel() - 1)]
    inputs = chunk[:, :-1].masked_fill(~valid[:, :-1], pad_id)
    labels = chunk[:, 1:].masked_fill(~valid[:, 1:], IGNORE_INDEX)
    return inputs, labels


def make_windows(ids: Tensor, seq_len: int, *, stride: int | None = None, pad_id: int = 0,
                 drop_last: bool = False, max_windows: int | None = None) -> Windows:
    """Windows starting at 0, S, 2S, … (S = ``stride``, default T) while a label is left to predict.

    The final window may be ragged: its missing positions are padded (inputs ``pad_id``, labels -100) unless
    ``drop_last``. ``max_windows`` keeps that many windows evenly spaced over the stream (first and last included).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    stride = seq_len if stride is None else stride
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    ids = _as_stream(ids, seq_len + 1 if drop_last else 2)
    last_start = ids.numel() - 1 - seq_len if drop_last else ids.numel() - 2
    starts = torch.arange(0, last_start + 1, stride)
    if max_windows is not None and max_windows < starts.numel():
        if max_windows <= 0:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        starts = starts[torch.linspace(0, starts.numel() - 1, max_windows).round().long().unique()]
    return Windows(*_gather(ids, starts, seq_len, pad_id))


class WindowSampler:
    """Training batches of random full windows; ``batch(step)`` depends only on (ids, T, B, seed, step).

    Starts are uniform over [0, n - T - 1] (drawn with ``numpy.random.default_rng([seed, step])``), so a run resumed
    at step k sees the same batches as one that never stopped. Iterating yields steps 0, 1, 2, … forever.
    """

    def __init__(self, ids: Tensor, seq_len: int, batch_size: int, seed: int = 0) -> None:
        if seq_len <= 0 or batch_size <= 0:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.ids = _as_stream(ids, seq_len + 1)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """(inputs, labels), both int64 (B, T), of training step ``step`` ≥ 0."""
        rng = np.random.default_rng([self.seed, step])
        starts = torch.from_numpy(rng.integers(0, self.ids.numel() - self.seq_len, size=self.batch_size))
        return _gather(self.ids, starts, self.seq_len, pad_id=0)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self.batch(step) for step in count())


# -------------------------------------------------------------------------------------------------------- assembled


@dataclass(frozen=True, eq=False)  # tensors have no truth value: compare by identity
class TokenizedText:
    """A tokenized corpus: the tokenizer, train/validation id streams (int64), and a description.

    ``meta`` holds the corpus description (source, Python version, files, bytes) plus ``tokenizer``, ``vocab_size``,
    ``train_tokens``, ``val_tokens`` and the cache ``key``.
    """

    tokenizer: Tokenizer
    train_ids: Tensor
    val_ids: Tensor
    meta: dict[str, Any]
    cache_path: Path | None
    cache_hit: bool

    @property
    def vocab_size(self) -> int:
        """V of the tokenizer (build the model with this)."""
        return self.tokenizer.vocab_size

    def sampler(self, batch_size: int, seq_len: int, seed: int = 0) -> WindowSampler:
        """Seeded random training windows over the training stream."""
        return WindowSampler(self.train_ids, seq_len, batch_size, seed)

    def validation(self, seq_len: int, max_windows: int | None = None) -> Windows:
        """The fixed validation set: consecutive windows of the validation stream, the ragged last one padded."""
        return make_windows(self.val_ids, seq_len, pad_id=self.tokenizer.eos_id, max_windows=max_windows)


def tokenize_corpus(corpus: Corpus, tokenizer: str = "bpe", vocab_size: int | None = None, *,
                    min_frequency: int = 2, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                    parallel: bool = False, progress: Progress | None = None) -> TokenizedText:
    """Tokenize ``corpus`` with a BPE trained on its training files (``"bpe"``, V = ``vocab_size``, default 8192)
    or with UTF-8 bytes (``"byte"``), through the cache at :func:`cache_root` ``(cache_dir)/text``.

    A cache hit neither trains nor encodes; a corrupt entry is rebuilt and rewritten; a cache that cannot be written
    is reported through ``progress`` (one line per stage) and skipped. ``parallel`` lets ``tokenizers`` use every
    core (same result; its thread pool then persists, and ``tokenizers`` disables it with a warning in processes
    forked afterwards, e.g. DataLoader workers).
    """
    report = progress or _silent
    settings = _tokenizer_settings(tokenizer, vocab_size, min_frequency)
    key = _cache_key(corpus, settings)
    path = cache_root(cache_dir) / "text" / f"{key}.pt" if use_cache else None
    found = None
    if path is not None and path.exists():
        found = _read_entry(path, key, parallel)
        report(f"cache hit: {path}" if found else f"cache entry unreadable, rebuilding: {path}")
    hit = found is not None
    if found is None:
        found = _build(corpus, settings, parallel, report)
        if path is not None:
            try:
                _write_entry(path, key, *found)
                report(f"cached: {path}")
            except OSError as exc:  # a read-only or full cache must not stop training
                report(f"cache not written ({exc.strerror or exc}): {path}")
    tok, train_ids, val_ids = found
    meta = dict(corpus.meta, tokenizer=tok.kind, vocab_size=tok.vocab_size, train_tokens=train_ids.numel(),
                val_tokens=val_ids.numel(), key=key)
    if tok.kind == "bpe":
        meta.update(requested_vocab_size=settings["vocab_size"], tokenizers=settings["tokenizers"])
    return TokenizedText(tok, train_ids, val_ids, meta, path, hit)


def _build(corpus: Corpus, settings: dict[str, Any], parallel: bool,
           report: Progress) -> tuple[Tokenizer, Tensor, Tensor]:
    """Train (BPE) or take (bytes) the tokenizer, then encode both splits."""
    train, val = corpus.texts_of("train"), corpus.texts_of("val")
    if settings["kind"] == "bpe":
        report(f"training BPE (V={settings['vocab_size']}) on {corpus.meta['train_bytes']} bytes")
        tok: Tokenizer = train_bpe(train, settings["vocab_size"], settings["min_frequency"], parallel)
    else:
        tok = ByteTokenizer()
    report(f"encoding {len(train)} train and {len(val)} validation files")
    return tok, tok.encode_documents(train, report), tok.encode_documents(val, report)
