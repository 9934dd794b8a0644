"""Config validation, overrides, example configs, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from apf_ray.cli import main
from apf_ray.config import ConfigError, load_config
from apf_ray.report import variant_overrides
from tests.helpers import tiny_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.local_steps=0", "train.local_steps"),
        ("strategy.apf.alpha=1.5", "strategy.apf.alpha"),
        ("strategy.apf.period_policy=fixed:0", "strategy.apf.period_policy"),
        ("strategy.name=sgd", "strategy.name"),
        ("train.clients_per_round=999", "clients_per_round"),
        ("data.bogus=1", "data.bogus"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_overrides_parse_yaml_values_into_nested_fields():
    cfg = load_config(None, ["strategy.apf.threshold=0.3", "cluster.pools=[{name: a}, {name: b, num_cpus: 2}]"])
    assert cfg.strategy.apf.threshold == 0.3
    assert [p.name for p in cfg.cluster.pools] == ["a", "b"] and cfg.cluster.pools[1].num_cpus == 2


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_variant_specs_map_to_the_strategy_section():
    assert variant_overrides("apf:aggressive_prob=0.3,value_dtype=float16") == [
        "strategy.name=apf", "strategy.apf.aggressive_prob=0.3", "strategy.value_dtype=float16"]
    assert variant_overrides("topk:ratio=0.01") == ["strategy.name=topk", "strategy.topk.ratio=0.01"]
    with pytest.raises(ValueError, match="no option 'ratio'"):
        variant_overrides("fedavg:ratio=1")


def _write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path


def test_cli_train_inprocess_writes_summary(tmp_path, capsys):
    cfg_file = _write(tiny_config(rounds=2), tmp_path / "c.yaml")
    assert main(["train", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert "final accuracy" in capsys.readouterr().out


def test_cli_reports_bad_config_with_exit_code_2(tmp_path, capsys):
    assert main(["train", "--inprocess", "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().out


def test_cli_compare_prints_savings_against_the_first_variant(tmp_path, capsys):
    cfg_file = _write(tiny_config(rounds=3), tmp_path / "c.yaml")
    out = tmp_path / "cmp"
    assert main(["compare", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(out),
                 "--strategies", "fedavg", "apf:threshold=0.95,alpha=0.5"]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fedavg", "apf:threshold=0.95,alpha=0.5"]
    assert rows[0]["uplink_saving"] == 0.0
    assert rows[1]["uplink_saving"] > 0.0 and rows[1]["bytes_up"] < rows[0]["bytes_up"]
    assert (out / "compare.png").is_file()
