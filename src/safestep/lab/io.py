"""Output helpers for the lab: JSON-ready values and atomic file writes (no half-written results)."""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["json_ready", "write_atomically", "write_text", "write_json", "write_figure"]


def json_ready(value: Any) -> Any:
    """Recursively convert to JSON types; non-finite floats become "nan", "inf" or "-inf"."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):
        return json_ready(value.tolist())
    return value


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write into a temporary file next to ``path``, then rename it over ``path``; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return write_atomically(path, lambda h: h.write(text.encode()))


def write_json(path: Path, payload: Any) -> Path:
    """Atomically write ``json_ready(payload)`` as indented JSON."""
    return write_text(path, json.dumps(json_ready(payload), indent=1) + "\n")


def write_figure(path: Path, figure: Any) -> Path:
    """Atomically save a matplotlib figure as PNG and close it."""
    import matplotlib.pyplot as plt

    try:
        return write_atomically(path, lambda h: figure.savefig(h, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(figure)
