"""Mutation test of the lab: run the lab tests with every geometry radius ×1, ×3 and ×1/3 and tabulate who goes red.

A test that measures a radius-dependent claim must fail when the radius is wrong by 3× in either direction; a
test file (one experiment) "survives" a mutant when all of its tests still pass. The mutant is installed at run
time by the repository's conftest.py (``--radius-mutant``); the geometry files are never edited.

    python lab/tools/radius_mutants.py                     # lab/tests/test_lab_*.py, a per-file and per-test table
    python lab/tools/radius_mutants.py lab/tests/test_lab_spike.py --markdown
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: pytest runs there, paths are relative to it
FACTORS = (1.0, 3.0, 1.0 / 3.0)
NOT_MINE = ("lab/tests/test_lab_text.py", "lab/tests/test_lab_lm.py")  # owned elsewhere; pass them explicitly to include


def _label(factor: float) -> str:
    return "×1" if factor == 1.0 else ("×3" if factor > 1 else "×1/3")


def run_suite(paths: list[str], factor: float) -> tuple[dict[str, str], float]:
    """{test id: "pass" | "FAIL" | "skip"} of one pytest run under ``factor``, and its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "",
                        f"--radius-mutant={factor!r}", f"--junitxml={report}", *paths],
                       cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        seconds = time.perf_counter() - started
        outcomes = {}
        for case in ET.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            failed = case.find("failure") is not None or case.find("error") is not None
            outcomes[test_id] = "FAIL" if failed else ("skip" if case.find("skipped") is not None else "pass")
    return outcomes, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", help="test files (default: lab/tests/test_lab_*.py except other owners')")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    parser.add_argument("--all-tests", action="store_true", help="list every test, not only those a mutant kills")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("lab/tests/test_lab_*.py")
                                 if str(p.relative_to(ROOT)) not in NOT_MINE)
    results = {}
    for factor in FACTORS:
        results[factor], seconds = run_suite(paths, factor)
        print(f"{_label(factor)}: {sum(v == 'FAIL' for v in results[factor].values())} failing of "
              f"{len(results[factor])} ({seconds:.0f} s)", file=sys.stderr)
    sep = " | " if args.markdown else "  "
    head = ["file", *(_label(f) for f in FACTORS)]
    print(("| " + sep.join(head) + " |\n|" + "---|" * len(head)) if args.markdown else sep.join(head))
    for path in paths:
        cells = []
        for factor in FACTORS:
            mine = [o for t, o in results[factor].items() if t.startswith(path.removesuffix(".py"))]
            failing = sum(o == "FAIL" for o in mine)
            cells.append(f"{failing}/{len(mine)} red" if failing else f"green ({len(mine)})")
        row = [path, *cells]
        print(("| " + sep.join(row) + " |") if args.markdown else sep.join(row))
    print()
    tests = sorted(set().union(*results.values()))
    shown = [t for t in tests if args.all_tests or any(results[f].get(t) == "FAIL" for f in FACTORS)]
    print(("| test | " + " | ".join(_label(f) for f in FACTORS) + " |\n|---|---|---|---|") if args.markdown else
          "test  " + "  ".join(_label(f) for f in FACTORS))
    for test in shown:
        row = [test, *(results[f].get(test, "-") for f in FACTORS)]
        print(("| " + " | ".join(row) + " |") if args.markdown else "  ".join(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
