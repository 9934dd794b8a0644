"""The README's plug-in example (``my_strategies.py`` in "Extending it") runs as written.

The block is copied verbatim into an empty working directory and used with the ``--set``
options its first line gives, through the installed ``apf-ray`` script (whose own folder, not
the working directory, heads ``sys.path``): in-process, and on a local Ray cluster, where the
module reaches the actors as a runtime environment's ``py_modules``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from actors.backend import PLUGIN_EXCLUDES, plugin_runtime_env
from apf_ray.config import load_config

REPO = Path(__file__).resolve().parent.parent
APF_RAY = Path(sys.executable).parent / "apf-ray"
SMALL = ["--set", "train.rounds=2", "--set", "data.num_clients=6", "--set", "train.clients_per_round=3",
         "--set", "train.local_steps=2", "--set", "output.tensorboard=false", "--set", "output.plots=false"]


def readme_plugin() -> tuple[str, list[str]]:
    """The README's ``my_strategies.py`` block and the ``--set`` options its first line names."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```python\n(# my_strategies\.py.*?)```", readme, re.S)
    assert block, "README: the my_strategies.py example is gone"
    code = block.group(1)
    options = code.splitlines()[0].partition("use with")[2].split()
    assert options[:2] == ["--set", "strategy.name=my_strategies:Median"], options
    return code, options


@pytest.fixture
def example_dir(tmp_path: Path) -> tuple[Path, list[str]]:
    code, options = readme_plugin()
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_strategies.py").write_text(code)
    return work, options


def train(work: Path, *args: str) -> dict:
    proc = subprocess.run([str(APF_RAY), "train", "--quiet", *args, *SMALL, "--output", "run"], cwd=work,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((work / "run" / "summary.json").read_text())


def test_the_readme_plugin_example_runs_in_process_from_the_working_directory(example_dir):
    work, options = example_dir
    summary = train(work, "--inprocess", *options)
    assert summary["rounds"] == 2 and summary["rounds_not_aggregated"] == 0
    assert summary["config"]["strategy"] == {"name": "my_strategies:Median", "options": {"step": 0.5},
                                             "uplink": []}


@pytest.mark.ray
def test_the_readme_plugin_example_runs_on_ray_and_equals_the_in_process_run(example_dir):
    work, options = example_dir
    local = train(work, "--inprocess", *options)
    (work / "inprocess").mkdir()
    (work / "run").rename(work / "inprocess" / "run")
    on_ray = train(work, *options)
    for key in ("final_accuracy", "bytes_up", "bytes_down", "rounds_not_aggregated"):
        assert on_ray[key] == local[key], key


def test_only_the_plugins_own_module_travels_to_the_cluster(example_dir, monkeypatch):
    work, _ = example_dir
    (work / "unrelated.bin").write_bytes(b"\0" * 1024)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    cfg = load_config(None, ["strategy.name=my_strategies:Median"])
    assert plugin_runtime_env(cfg) == {"py_modules": [str(work / "my_strategies.py")], "excludes": PLUGIN_EXCLUDES}
    assert plugin_runtime_env(load_config(None)) is None  # built-in plug-ins only: nothing to ship
