"""``ray job submit`` of apf-ray commands to a running cluster (head started with ``ray start``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_config
from tests.ray_cluster import job_head

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def _submit(address: str, *command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A blocking ``ray job submit``: it exits non-zero when the job fails."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # the job client sends the token only then
    return subprocess.run(["ray", "job", "submit", "--address", address, "--", *command], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_train_and_a_short_tune_run_as_jobs_on_a_running_cluster(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config("cluster.pools=[{name: cpu, num_actors: 1, num_cpus: 1}]",
                                                 rounds=2).to_dict()))
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({
        "name": "job", "base": str(config), "search_space": {"strategy.options.threshold": {"grid": [0.3]}},
        "objective": [{"metric": "accuracy"}], "search": {"algorithm": "grid"}, "num_samples": 1,
    }))
    apf_ray = [sys.executable, "-m", "apf_ray.cli"]
    with job_head(num_cpus=2) as address:
        train = _submit(address, *apf_ray, "train", "--config", str(config), "--output", str(tmp_path / "run"),
                        "--quiet")
        assert train.returncode == 0, train.stdout + train.stderr
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["rounds"] == 2 and summary["final_accuracy"] is not None
        tune = _submit(address, *apf_ray, "tune", "--config", str(search), "--output", str(tmp_path / "search"))
        assert tune.returncode == 0, tune.stdout + tune.stderr
    assert json.loads((tmp_path / "search" / "summary.json").read_text())["statuses"]["completed"] == 1
    assert (tmp_path / "search" / "baseline" / "summary.json").is_file()
