"""The reproduction lab's result contract and its writers: results.json, PNG figures and report.md.

Every experiment returns an ``ExperimentResult``: its protocol, configuration, seeds, metrics and a list of
``Claim`` rows that put the paper's number beside ours with a plain verdict. ``write_result`` writes one
experiment's folder; ``write_combined_report`` indexes several. ``reproduction_table`` turns a folder of
results.json files back into one markdown table (every claim, unflattering verdicts first) and
``replace_block`` puts it between a document's ``reproduction-table`` markers (`safestep report`).
"""
from __future__ import annotations

import json
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .io import write_figure, write_json, write_text

__all__ = ["VERDICTS", "Claim", "ExperimentResult", "environment", "command", "write_result", "write_combined_report",
           "load_results", "reproduction_table", "replace_block"]

VERDICTS = ("holds", "differs", "partly", "not in paper")
UNFLATTERING_FIRST = ("differs", "partly", "holds", "not in paper")
TABLE_BLOCK = "reproduction-table"


@dataclass(frozen=True)
class Claim:
    """One row of "paper vs ours": the claim, the paper's number, ours, a verdict and the protocol used."""

    claim: str
    paper: str
    ours: str
    verdict: str
    protocol: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass
class ExperimentResult:
    """What one experiment measured. ``figures`` maps a file stem to a function building a matplotlib Figure."""

    name: str
    title: str
    paper_ref: str
    protocol: str
    config: dict[str, Any]
    seeds: list[int]
    metrics: dict[str, Any]
    claims: list[Claim]
    figures: dict[str, Callable[[], Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    command: str | None = None  # how it was produced, when not ``safestep reproduce NAME [--quick]``


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded with every result."""
    import numpy
    import torch

    from safestep import __version__

    return {
        "safestep": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def command(name: str, quick: bool) -> str:
    """The CLI command that reproduces a result."""
    return f"safestep reproduce {name}" + (" --quick" if quick else "")


def _claims_table(claims: list[Claim]) -> list[str]:
    cell = _cell

    rows = ["| claim | paper | ours | verdict |", "|---|---|---|---|"]
    rows += [f"| {cell(c.claim)} | {cell(c.paper)} | {cell(c.ours)} | **{c.verdict}** |" for c in claims]
    return rows


_QUICK_BANNER = ("> **Quick (CI-sized) run:** fewer seeds, steps or settings than the paper's protocol; the verdicts "
                 "describe this run. Run without `--quick` for the full protocol.")


def _markdown(result: ExperimentResult, figure_files: list[str], quick: bool) -> str:
    lines = [f"# {result.title}", ""] + ([_QUICK_BANNER, ""] if quick else []) + [
             f"Paper reference: {result.paper_ref}. Command: `{result.command or command(result.name, quick)}`. "
             f"Seeds: {result.seeds}. "
             f"Run time: {result.seconds:.1f} s.", "", "## Protocol", "", result.protocol, "",
             "## Paper vs ours", ""]
    lines += _claims_table(result.claims)
    protocols = [(c.claim, c.protocol) for c in result.claims if c.protocol]
    if protocols:
        lines += ["", "Protocol per claim:", ""] + [f"- *{claim}*: {text}" for claim, text in protocols]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result.notes]
    if figure_files:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figure_files]
    lines += ["", "Raw numbers, configuration and environment: `results.json`.", ""]
    return "\n".join(lines)


def write_result(result: ExperimentResult, out_dir: str | Path, quick: bool = False) -> dict[str, Path]:
    """Write results.json, one PNG per figure and report.md into ``out_dir``; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for stem, build in result.figures.items():
        paths[f"{stem}.png"] = write_figure(out / f"{stem}.png", build())
    payload = {
        "name": result.name, "title": result.title, "quick": quick,
        "command": result.command or command(result.name, quick),
        "paper_ref": result.paper_ref,
        "protocol": result.protocol,
        "config": result.config, "seeds": result.seeds, "seconds": result.seconds, "environment": environment(),
        "claims": [vars(c) for c in result.claims], "notes": result.notes, "metrics": result.metrics,
    }
    paths["results.json"] = write_json(out / "results.json", payload)
    paths["report.md"] = write_text(out / "report.md", _markdown(result, [p for p in paths if p.endswith(".png")], quick))
    return paths


def write_combined_report(results: list[ExperimentResult], out_dir: str | Path, quick: bool = False) -> Path:
    """Write out_dir/report.md: every experiment's claims in one table, linking each experiment's folder."""
    lines = ["# safestep reproduction report", ""] + ([_QUICK_BANNER, ""] if quick else []) + [
             "Each experiment's folder holds its own report.md, results.json and figures.", "",
             "| experiment | claim | paper | ours | verdict |", "|---|---|---|---|---|"]
    for result in results:
        for c in result.claims:
            lines.append(f"| [{result.name}]({result.name}/report.md) | {c.claim} | {c.paper} | {c.ours} | "
                         f"**{c.verdict}** |")
    verdicts = [c.verdict for r in results for c in r.claims]
    lines += ["", "Verdicts: " + ", ".join(f"{v} {verdicts.count(v)}" for v in VERDICTS if verdicts.count(v)), ""]
    return write_text(Path(out_dir) / "report.md", "\n".join(lines))


def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every ``*/results.json`` directly under ``folder``, sorted by experiment name."""
    paths = sorted(Path(folder).glob("*/results.json"))
    return [json.loads(path.read_text()) for path in paths]


def _seeds_text(seeds: list[Any]) -> str:
    if not seeds:
        return "–"
    if seeds == list(range(len(seeds))):
        return f"{len(seeds)} (0–{len(seeds) - 1})" if len(seeds) > 1 else "1 (0)"
    return f"{len(seeds)} ({', '.join(map(str, seeds))})"


def reproduction_table(results: list[dict[str, Any]], folder: str = "results", missing: Sequence[str] = ()) -> str:
    """One markdown row per claim of every result: unflattering verdicts first, then by experiment.

    Columns: experiment (linking ``folder/<name>/report.md``), claim, paper, ours, verdict, seeds, command.
    ``missing`` names experiments without a results file; each gets a "not run" row at the top.
    """
    rows = [(UNFLATTERING_FIRST.index(claim["verdict"]), index, payload, claim)
            for index, payload in enumerate(results) for claim in payload["claims"]]
    lines = ["| experiment | claim | paper | ours | verdict | seeds | command |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | every claim of this experiment | – | no results file yet | **not run** | – | "
              f"`{command(name, False)}` |" for name in missing]
    for _, _, payload, claim in sorted(rows, key=lambda row: row[:2]):
        name = payload["name"]
        run = payload.get("command", command(name, payload.get("quick", False)))
        lines.append(f"| [{name}]({folder}/{name}/report.md) | {_cell(claim['claim'])} | {_cell(claim['paper'])} | "
                     f"{_cell(claim['ours'])} | **{claim['verdict']}** | {_seeds_text(payload['seeds'])} | `{run}` |")
    verdicts = [claim["verdict"] for payload in results for claim in payload["claims"]]
    quick = [payload["name"] for payload in results if payload.get("quick")]
    lines += ["", "Verdicts: " + ", ".join(f"{v} {verdicts.count(v)}" for v in UNFLATTERING_FIRST if v in verdicts)
              + "." + (f" Quick (CI-sized) results, not the paper's protocol: {', '.join(quick)}." if quick else "")]
    return "\n".join(lines)


def replace_block(text: str, table: str, name: str = TABLE_BLOCK) -> str:
    """``text`` with the lines between its ``<!-- {name}:start ... -->`` and ``<!-- {name}:end -->`` markers
    replaced by ``table`` (ValueError if the markers are missing or out of order)."""
    start, end = f"<!-- {name}:start", f"<!-- {name}:end -->"
    pattern = re.compile(rf"({re.escape(start)}[^\n]*-->\n)(.*?)(^{re.escape(end)})", re.S | re.M)
    match = pattern.search(text)
    if match is None:
        raise ValueError(f"no '{start} ... -->' … '{end}' block found")
    return text[:match.start(2)] + table.rstrip("\n") + "\n" + text[match.start(3):]
