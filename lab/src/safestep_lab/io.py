"""Output helpers for the lab: atomic file writes (no half-written results) and the package's one JSON encoder,
``json_ready``, re-exported from ``safestep.telemetry``."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from safestep.telemetry import json_ready

__all__ = ["json_ready", "write_atomically", "write_text", "write_json", "write_figure", "text_table"]


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
    """Atomically save a matplotlib ``Figure`` as PNG; no backend or pyplot state is touched."""
    return write_atomically(path, lambda h: figure.savefig(h, format="png", dpi=110, bbox_inches="tight"))


def text_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """``rows`` under ``header`` as columns aligned with spaces, or as a markdown table when ``markdown``."""
    table = [header, *rows]
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in table]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
