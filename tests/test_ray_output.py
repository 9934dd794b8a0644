"""What a user's terminal shows from a real Ray run of the command line: quiet, default, verbose.

Each test runs ``python -m apf_ray.cli train`` in a subprocess (its own local Ray cluster, as a
user gets it) and reads what it wrote to stdout and stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import tiny_config

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent
RAY_NOISE = ("Token authentication", "Started a local Ray instance", "WARNING", "INFO")


def _train(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(rounds=2).to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_AUTH_MODE", None)  # a user's shell does not set it; Ray then logs its token notice
    proc = subprocess.run([sys.executable, "-m", "apf_ray.cli", "train", "--config", str(config),
                           "--output", str(tmp_path / "run"), *flags],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_quiet_prints_only_the_summary_table_and_nothing_of_ray(tmp_path):
    proc = _train(tmp_path, "--quiet")
    assert proc.stderr == ""
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines[0].strip() == "tiny · apf"
    assert all(line[0] in "┌│└" for line in lines[1:]), lines  # the table and nothing else
    assert "final accuracy" in proc.stdout and "pool" not in proc.stdout


def test_by_default_the_terminal_shows_progress_and_pool_events_but_not_rays_start_up(tmp_path):
    proc = _train(tmp_path)
    assert "round 1: pool cpu: +2 actor(s)" in proc.stdout and "2/2" in proc.stdout
    assert "final accuracy" in proc.stdout
    assert not any(noise in proc.stdout + proc.stderr for noise in RAY_NOISE), proc.stderr


def test_verbose_shows_rays_own_logs(tmp_path):
    proc = _train(tmp_path, "--verbose")
    assert "Started a local Ray instance" in proc.stderr  # (token auth is on explicitly: Ray no longer warns of it)
    assert "final accuracy" in proc.stdout
