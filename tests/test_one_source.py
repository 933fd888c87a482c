"""One source per formula: the global norm, the central difference and IGNORE_INDEX are written once.

The scan reads the library, the lab and the benchmarks as text (nothing is imported) and fails when a second
implementation appears, naming the file and line: call ``safestep.norm.global_norm`` or
``safestep.probe.central_difference`` and import ``safestep.bounds.IGNORE_INDEX`` instead.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = [ROOT / "src" / "safestep", ROOT / "lab" / "src", ROOT / "benchmarks"]

RULES = {
    "global norm": (
        re.compile(r"sqrt\(\s*sum\(.*(pow\(2\)|square\(\)|\*\*\s*2)|vector_norm\(\s*torch\.(stack|cat)\(|_foreach_norm\("),
        ROOT / "src" / "safestep" / "norm.py",
    ),
    "central difference": (
        re.compile(r"-\s*minus\s*\)\s*/\s*\(?\s*2|/\s*\(\s*2(\.0)?\s*\*\s*h\s*\)"),
        ROOT / "src" / "safestep" / "probe" / "base.py",
    ),
    "IGNORE_INDEX": (re.compile(r"^\s*_?IGNORE_INDEX\s*=\s*-100"), ROOT / "src" / "safestep" / "bounds.py"),
}


def _sources():
    for tree in TREES:
        yield from sorted(tree.rglob("*.py"))


def find_copies(rule: str, sources=None) -> list[str]:
    """``path:line`` of every line matching ``rule`` outside its one home."""
    pattern, home = RULES[rule]
    found = []
    for path in sources if sources is not None else _sources():
        if path == home:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}")
    return found


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_formula_has_one_implementation(rule):
    pattern, home = RULES[rule]
    assert any(pattern.search(line) for line in home.read_text(encoding="utf-8").splitlines()), f"{rule} left {home}"
    assert find_copies(rule) == []


@pytest.mark.parametrize("rule, copy", [
    ("global norm", "    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))"),
    ("global norm", "    n = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))"),
    ("central difference", "    slopes = (plus - minus) / (2 * h)"),
    ("IGNORE_INDEX", "IGNORE_INDEX = -100"),
])
def test_a_second_implementation_is_found(tmp_path, rule, copy):
    extra = tmp_path / "copy.py"
    extra.write_text(f"import math\n\n\ndef f(tensors, grads, plus, minus, h):\n    pass\n{copy}\n")
    pattern, _ = RULES[rule]
    assert [line for line in extra.read_text().splitlines() if pattern.search(line)] == [copy]
