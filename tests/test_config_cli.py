"""Config validation, overrides, example configs, and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apf_ray.cli import main
from apf_ray.config import ConfigError, build_config, load_config
from apf_ray.variants import variant_overrides
from tests.helpers import png_contents, tiny_config

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
    assert "train.lr" in capsys.readouterr().err


def test_cli_compare_prints_savings_against_the_first_variant(tmp_path, capsys):
    cfg_file = _write(tiny_config(rounds=3), tmp_path / "c.yaml")
    out = tmp_path / "cmp"
    assert main(["compare", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(out),
                 "--strategies", "fedavg", "apf:threshold=0.95,alpha=0.5"]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fedavg", "apf:threshold=0.95,alpha=0.5"]
    assert rows[0]["uplink_saving"] == 0.0
    assert rows[1]["uplink_saving"] > 0.0 and rows[1]["bytes_up"] < rows[0]["bytes_up"]
    drawn = png_contents(out / "compare.png")  # one line per variant, every round, in every panel
    assert [p["series"] for p in drawn["panels"]] == [{"fedavg": 3, "apf:threshold=0.95,alpha=0.5": 3}] * 3


def test_the_built_in_defaults_are_the_default_workload_file():
    from apf_ray.config import ExperimentConfig

    default_file = Path(__file__).parent.parent / "configs" / "digits-lenet5.yaml"
    assert ExperimentConfig().to_dict() == load_config(default_file).to_dict()
    assert load_config(None).to_dict() == ExperimentConfig().to_dict()


@pytest.mark.parametrize("item, element", [
    ("cluster.pools.5.name=x", "index 5 is out of range"),
    ("cluster.pools.name=x", "'name' is not an index"),
    ("train.lr.x=1", "train.lr is a value"),
    ("train.bogus=1", "train.bogus: unknown key"),
    ("train.lr=-1", "train.lr: Input should be greater than 0"),
    ("strategy.options.threshold=[1", "not valid YAML"),
    ("train", "expected key=value"),
    ("train..lr=1", "dotted path"),
])
def test_an_override_error_names_the_set_item_and_the_wrong_path_element(capsys, item, element):
    assert main(["train", "--inprocess", "--set", item]) == 2
    out = capsys.readouterr()
    assert f"--set {item}" in out.err and element in out.err
    assert "Traceback" not in out.out + out.err


def test_an_error_caused_by_a_set_does_not_blame_the_config_file(tmp_path, capsys):
    config = Path(__file__).parent.parent / "configs/digits-lenet5.yaml"
    assert main(["train", "--inprocess", "--config", str(config), "--set", "train.clients_per_round=50"]) == 2
    out = capsys.readouterr().err
    assert "from --set train.clients_per_round=50" in out and "digits-lenet5.yaml" not in out
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {lr: -1}\n")
    assert main(["train", "--inprocess", "--config", str(broken)]) == 2
    assert "broken.yaml" in capsys.readouterr().err  # an error in the file does name it


def test_help_imports_neither_torch_nor_ray_nor_pydantic():
    code = ("import sys\nfrom apf_ray.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = ('torch', 'ray', 'pydantic', 'numpy', 'pyarrow', 'matplotlib', 'rich')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    usage, _, loaded = proc.stdout.rstrip().rpartition("\n")
    assert "usage: apf-ray" in usage and "``" not in usage  # plain text, no reST markup
    assert loaded == "[]"


def test_importing_the_package_loads_nothing_heavy_until_a_name_is_used():
    code = ("import sys, apf_ray\nbefore = 'torch' in sys.modules or 'pydantic' in sys.modules\n"
            "cfg = apf_ray.load_config(None)\nprint(before, 'pydantic' in sys.modules, cfg.name)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["False", "True", "digits-lenet5"], proc.stderr


def test_resuming_a_finished_run_prints_its_summary_without_starting_ray(tmp_path):
    cfg_file = _write(tiny_config(rounds=2), tmp_path / "c.yaml")
    run_dir = tmp_path / "r"
    assert main(["train", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(run_dir)]) == 0
    code = (f"import sys\nfrom apf_ray.cli import main\nrc = main(['train', '--resume', {str(run_dir)!r}])\n"
            "print('ray loaded:', 'ray' in sys.modules, 'rc:', rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "is finished (2 rounds)" in proc.stdout and "final accuracy" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("ray loaded: False rc: 0")


def test_resuming_a_finished_run_with_more_rounds_continues_it(tmp_path, capsys):
    cfg_file = _write(tiny_config(rounds=2), tmp_path / "c.yaml")
    run_dir = tmp_path / "r"
    assert main(["train", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(run_dir)]) == 0
    assert main(["train", "--inprocess", "--quiet", "--resume", str(run_dir), "--set", "train.rounds=3"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["rounds"] == 3
    assert "is finished" not in capsys.readouterr().out


def _strict_json(text: str):
    """json.loads that refuses NaN and ±Infinity, which Python's json writes and accepts by default."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_every_json_a_fedavg_compare_writes_is_strict_with_null_for_missing_values(tmp_path):
    cfg_file = _write(tiny_config(rounds=2), tmp_path / "c.yaml")
    out = tmp_path / "cmp"
    assert main(["compare", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(out),
                 "--strategies", "fedavg", "cmfl"]) == 0
    files = [out / "compare.json", *out.glob("*/summary.json"), *out.glob("*/journal/*.jsonl"),
             *out.glob("*/checkpoints/*/*.json")]
    assert len(files) >= 7
    for path in files:
        for doc in (path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]):
            _strict_json(doc)
    fedavg = _strict_json((out / "fedavg" / "summary.json").read_text())
    assert fedavg["threshold_final"] is None and fedavg["frozen_fraction_final"] == 0.0


def test_quiet_prints_only_the_final_summary(tmp_path, capsys):
    cfg_file = _write(tiny_config(rounds=2), tmp_path / "c.yaml")
    assert main(["train", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(tmp_path / "r")]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    lines = [line for line in out.out.splitlines() if line.strip()]
    assert lines[0].strip() == "tiny · apf" and "run directory" in out.out
    assert all(line[0] in "┌│└" for line in lines[1:]), lines  # the table and nothing else
