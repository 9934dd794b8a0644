"""The README's measured numbers come from result files: rendered, never typed."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import load_script

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


def _renderer():
    return load_script(REPO / "bench" / "readme_tables.py")


def test_the_readme_tables_are_what_the_renderer_makes_of_the_committed_results():
    text = README.read_text()
    assert _renderer().render_readme(text) == text, "run: python3 bench/readme_tables.py"


def test_every_table_of_measurements_in_the_readme_is_a_rendered_block():
    text = README.read_text()
    results = text[text.index("## Results"):text.index("## Tests")]
    outside = re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", "", results, flags=re.S)
    tables = re.findall(r"^\|(.*)\|$\n^\|---", outside, flags=re.M)
    assert tables == []


def test_every_result_file_is_strict_json_and_states_its_machine():
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    files = sorted((REPO / "docs" / "results").glob("*.json")) + sorted((REPO / "docs" / "results").glob("*/*.json"))
    assert {f.stem for f in files} >= {"quickstart", "default_compare", "all_strategies", "controller",
                                       "gpu_local_training", "orchestration"}
    for path in files:
        data = json.loads(path.read_text(), parse_constant=refuse)
        assert data["machine"], path.name
