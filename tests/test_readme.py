"""The README's and docs' measured numbers come from result files, and the config reference from the
config models: rendered, never typed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import load_script

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS_PAGE = REPO / "docs" / "RESULTS.md"


def _renderer():
    return load_script(REPO / "bench" / "readme_tables.py")


def test_the_measured_tables_are_what_the_renderer_makes_of_the_committed_results():
    renderer = _renderer()
    texts = {path: path.read_text() for path in renderer.documents()}
    assert README in texts and RESULTS_PAGE in texts
    rendered = renderer.render_all(texts)  # raises unless every result has its one block
    stale = [path.name for path in texts if rendered[path] != texts[path]]
    assert stale == [], "run: python3 bench/readme_tables.py"


def test_a_rendered_block_links_relative_to_the_page_it_is_in():
    renderer = _renderer()
    block = "<!-- results:controller -->\n<!-- /results:controller -->"
    top, _ = renderer.render_blocks(block, README)
    inside, _ = renderer.render_blocks(block, RESULTS_PAGE)
    assert "](docs/results/controller.json)" in top
    assert "](results/controller.json)" in inside and "](docs/" not in inside


def test_the_budget_benchmark_renders_each_search_and_the_mean_per_searcher_from_its_file(tmp_path):
    renderer = _renderer()
    renderer.RESULTS = tmp_path
    assert renderer.render_search_budget().startswith("*Not measured yet*")  # until the benchmark has run
    quick = json.loads((REPO / "docs" / "results" / "search_budget_quick.json").read_text())  # the same layout
    (tmp_path / "search_budget.json").write_text(json.dumps(quick))
    text = renderer.render_search_budget()
    random = next(s for s in quick["searches"] if s["algorithm"] == "random")
    savings = [f"{100 * random['at'][b]['saving']:.1f}%" for b in ("2", "4", "8")]
    row = f"| random | 0 | {' | '.join(savings)} |"
    assert row in text and "| search | at 2 | at 4 | at 8 |" in text
    assert text.count("\n| pbt |") == 2 and "QUICK SMOKE SCALE" in text  # what the file says it is


def test_every_table_of_measurements_on_the_results_page_is_a_rendered_block():
    outside = re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", "", RESULTS_PAGE.read_text(), flags=re.S)
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


def test_the_config_reference_is_generated_from_the_config_models():
    reference = load_script(REPO / "scripts" / "config_reference.py")
    text = reference.render()
    assert (REPO / "docs" / "CONFIG.md").read_text() == text, "run: python3 scripts/config_reference.py"
    # every key a config can set is documented, nested sections and plug-in options included
    for key in ("train.rounds", "cluster.pools[].network.up_mbps", "defence.trim_fraction",
                "strategy.options.period_policy", "scheduler.perturbation_interval", "objective[].last_n"):
        assert f"| `{key}` |" in text, key
    assert "| `train.lr` | float | `0.05` | > 0, ≤ 10 |" in text  # type, default and range from the model
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "config_reference.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_every_apf_ray_command_of_the_readme_examples_parses_and_its_configs_and_variants_are_valid():
    from apf_ray.cli import build_parser
    from apf_ray.config import build_config, load_config
    from apf_ray.variants import variant_overrides

    text = README.read_text()
    examples = text[text.index("## One example per command"):text.index("\n## ", text.index("## One example"))]
    block = re.search(r"```bash\n(.*?)```", examples, re.S).group(1).replace("\\\n", " ")
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.lstrip().startswith("apf-ray ")]
    assert {c[1] for c in commands} == {"train", "compare", "tune", "reproduce"}
    for argv in commands:
        args = build_parser().parse_args([a.replace("$PWD", str(REPO)) for a in argv[1:]])  # exits on a bad flag
        config = getattr(args, "config", None)
        if argv[1] == "tune" or (config or "").startswith("runs/"):
            continue  # a search file (tune's own tests load them all), or a file an example writes first
        cfg = load_config(config and REPO / config, getattr(args, "set", None) or [])
        for spec in getattr(args, "strategies", None) or []:
            build_config(cfg.to_dict(), variant_overrides(spec, cfg.strategy.name))  # raises on a bad variant
