"""Messages a person can act on: what `apf-ray` prints for a bad config file, a bad value, a run
that learned nothing. Each test runs the real command line in a subprocess and reads its stdout,
stderr and exit status as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apf_ray.errors import EXCERPT_CHARS
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parent.parent


def apf_ray(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apf_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def error_lines(proc: subprocess.CompletedProcess, status: int = 2) -> list[str]:
    """The ``error:`` lines of a failed command: on stderr, nothing on stdout, no traceback."""
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), proc.stderr
    return lines


def test_each_bad_field_of_a_config_file_is_its_own_error_line_on_stderr(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  lr: -1\n  rounds: 0\n  lrr: 3\n")
    lines = error_lines(apf_ray("train", "--inprocess", "--config", str(config)))
    assert len(lines) == 3, lines
    assert all(f"{config}: train." in line for line in lines)
    assert any("train.lr: Input should be greater than 0 (got -1)" in line for line in lines)
    assert any("train.rounds: Input should be greater than or equal to 1 (got 0)" in line for line in lines)
    assert any("train.lrr: unknown key; did you mean 'lr'?" in line for line in lines)


@pytest.mark.parametrize("override, expected", [
    ("trian.rounds=3", "trian: unknown key; did you mean 'train'?"),
    ("cluster.pools=[{name: a, num_cpu: 2}]", "cluster.pools.0.num_cpu: unknown key; did you mean 'num_cpus'?"),
    ("strategy.options.treshold=0.3", "strategy.options.treshold: unknown key; did you mean 'threshold'?"),
])
def test_an_unknown_key_suggests_the_closest_known_one(override, expected):
    [line] = error_lines(apf_ray("train", "--inprocess", "--set", override))
    assert expected in line and f"— from --set {override}" in line


def test_a_search_file_given_to_train_says_it_is_for_apf_ray_tune():
    [line] = error_lines(apf_ray("train", "--inprocess", "--config", "tune_configs/tiny.yaml"))
    assert "tune_configs/tiny.yaml is a search file for apf-ray tune" in line
    assert "apf-ray tune --config tune_configs/tiny.yaml" in line


def _alias_bomb(path: Path, levels: int = 9, width: int = 9) -> Path:
    """Nested YAML aliases: ~300 bytes that stand for width**levels (387 million) values."""
    lines = ["a0: &a0 [" + ",".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_yaml_alias_bomb_is_refused_while_loading_naming_the_file(tmp_path):
    bomb = _alias_bomb(tmp_path / "bomb.yaml")
    assert bomb.stat().st_size < 400
    [line] = error_lines(apf_ray("train", "--inprocess", "--config", str(bomb), timeout=120))
    assert f"config file {bomb} is not valid YAML: its aliases expand to more than 100,000 values" in line


def test_a_huge_value_is_quoted_as_a_bounded_excerpt(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text(yaml.safe_dump({"train": {"rounds": list(range(5000)), "lr": "y" * 100_000}}))
    lines = error_lines(apf_ray("train", "--inprocess", "--config", str(config)))
    assert len(lines) == 2
    for line in lines:
        value = line.partition("(got ")[2]
        assert value and len(value) <= EXCERPT_CHARS + 1, line  # the excerpt and its closing parenthesis


def test_a_long_set_item_is_quoted_as_a_bounded_excerpt():
    item = "train.rounds=[" + ",".join(["1"] * 5000) + "]"
    [line] = error_lines(apf_ray("train", "--inprocess", "--set", item))
    assert "train.rounds: Input should be a valid integer" in line and len(line) < 300, line


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty; leave out --config for the default workload"),
    (b"# only a comment\n", "is empty"),
    (b"train: {lr: [1\n", "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 2, column 1"),
    (b"\xff\xfetrain: {}\n", "is not UTF-8 text (byte 0xff at offset 0)"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "is a binary file, not YAML text"),
    (b"- a\n- b\n", "must hold a mapping of settings at the top level, not list"),
])
def test_a_config_file_that_is_not_a_config_is_one_line_naming_the_file(tmp_path, content, expected):
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    [line] = error_lines(apf_ray("train", "--inprocess", "--config", str(config)))
    assert f"config file {config} {expected}" in line


def test_a_folder_given_as_config_file_says_so(tmp_path):
    [line] = error_lines(apf_ray("train", "--inprocess", "--config", str(tmp_path)))
    assert line == f"error: config file {tmp_path} is a directory"


def test_a_run_in_which_no_round_aggregated_exits_1_and_keeps_its_summary(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config("faults.corrupt_upload_prob=1", rounds=2).to_dict()))
    run_dir = tmp_path / "run"
    proc = apf_ray("train", "--inprocess", "--quiet", "--config", str(config), "--output", str(run_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "rounds not aggregated" in proc.stdout  # the summary table is still printed
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"error: the run in {run_dir}: none of its 2 round(s) aggregated")
    assert "6 upload(s) rejected" in line
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["rounds_not_aggregated"] == 2
