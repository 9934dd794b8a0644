"""Config validation, overrides, example configs, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from apf_ray.cli import main
from apf_ray.config import ConfigError, build_config, load_config
from apf_ray.variants import variant_overrides
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
        ("strategy.options.alpha=1.5", "strategy.options.alpha"),
        ("strategy.options.period_policy=fixed:0", "strategy.options.period_policy"),
        ("strategy.options.bogus=1", "strategy.options.bogus"),
        ("strategy.uplink=[{name: topk, ratio: 0}]", "strategy.uplink.0.ratio"),
        ("strategy.name=sgd", "strategy.name"),
        ("train.clients_per_round=999", "clients_per_round"),
        ("data.bogus=1", "data.bogus"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_overrides_parse_yaml_values_into_nested_fields():
    cfg = load_config(None, ["strategy.options.threshold=0.3", "cluster.pools=[{name: a}, {name: b, num_cpus: 2}]"])
    assert cfg.strategy.options["threshold"] == 0.3
    assert [p.name for p in cfg.cluster.pools] == ["a", "b"] and cfg.cluster.pools[1].num_cpus == 2


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_variant_specs_map_to_strategy_options_and_uplink_stages():
    assert variant_overrides("apf:aggressive_prob=0.3+float16", "apf") == {
        "strategy.name": "apf", "strategy.options.aggressive_prob": 0.3, "strategy.uplink": ["float16"]}
    assert variant_overrides("fedavg+topk:ratio=0.01+int8", "apf") == {
        "strategy.name": "fedavg", "strategy.options": {},
        "strategy.uplink": [{"name": "topk", "ratio": 0.01}, "int8"]}
    with pytest.raises(ValueError, match="expected key=value"):
        variant_overrides("apf:ratio", "apf")


def test_a_variant_keeps_the_configs_options_of_the_same_strategy_and_drops_another_strategys():
    base = load_config(None)  # apf with T = 0.2
    same = build_config(base.to_dict(), variant_overrides("apf:aggressive_prob=0.3", "apf"))
    assert same.strategy.options["threshold"] == 0.2 and same.strategy.options["aggressive_prob"] == 0.3
    other = build_config(base.to_dict(), variant_overrides("fedavg", "apf"))
    assert other.strategy.options == {}
    with pytest.raises(ConfigError, match=r"strategy\.options\.ratio"):
        build_config(base.to_dict(), variant_overrides("fedavg:ratio=1", "apf"))


def _write(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
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
