"""README numbers are data: the demo table is generated from the committed output of `make demo`."""
import json
from pathlib import Path

from safestep_lab.demo import README_BLOCK, format_table
from safestep_lab.report import replace_block

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "lab" / "demo-results" / "results.json"


def test_the_readme_demo_table_is_the_committed_demo_run():
    payload = json.loads(RESULTS.read_text())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert replace_block(readme, format_table(payload, markdown=True), README_BLOCK) == readme
    config = payload["config"]  # the run `make demo` makes: `safestep demo` with its defaults
    assert (config["steps"], config["seed"], config["spike_factor"]) == (400, 0, 1e4)


def test_the_generated_table_follows_the_numbers(tmp_path):
    payload = json.loads(RESULTS.read_text())
    payload["runs"][0]["test_accuracy"] = 0.123456
    assert "| 0.123 |" in format_table(payload, markdown=True)
