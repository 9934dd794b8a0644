"""The Python API: the README's example runs as written, and Results reads any run folder."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

import apf_ray
from apf_ray.run import run
from tests.helpers import CrashAfter, png_contents, tiny_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_MARKER = "<!-- python-api-example: run by tests/test_api.py -->"


def readme_example() -> str:
    """The README's Python API example: the first ```python block after its marker."""
    readme = (REPO / "README.md").read_text()
    assert EXAMPLE_MARKER in readme
    block = re.search(r"```python\n(.*?)```", readme.split(EXAMPLE_MARKER, 1)[1], re.S)
    return block.group(1)


def test_the_readme_python_example_runs_and_writes_what_it_promises(tmp_path, monkeypatch, capsys):
    code = readme_example()
    assert '"train.rounds": 20' in code
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"train.rounds": 20', '"train.rounds": 2'), "README.md", "exec"), {})
    run_dir = tmp_path / "runs" / "notebook"
    assert (run_dir / "summary.json").is_file()
    drawn = png_contents(run_dir / "curves.png")
    assert drawn["title"].startswith("notebook: ") and len(drawn["panels"]) == 3
    assert all(len(p["series"]) == 1 and list(p["series"].values()) == [2] for p in drawn["panels"][1:])
    printed = capsys.readouterr().out
    assert "test_accuracy" in printed and "cum_bytes_up" in printed


def test_results_give_the_summary_and_the_round_and_client_tables(tmp_path):
    summary = run(tiny_config(rounds=3), tmp_path)
    res = apf_ray.Results(tmp_path)
    assert res.summary["bytes_up"] == summary["bytes_up"] and res.config.name == "tiny"
    rounds = res.rounds()
    assert isinstance(rounds, pa.Table) and rounds.column("round").to_pylist() == [1, 2, 3]
    assert rounds.column("cum_bytes_up").to_pylist()[-1] == summary["bytes_up"]
    assert res.clients().num_rows == 9 and res.layers().num_rows == 3 * 5
    frame = res.rounds_frame()
    assert list(frame["round"]) == [1, 2, 3] and frame["test_accuracy"].iloc[-1] == summary["final_accuracy"]
    drawn = png_contents(res.plot(tmp_path / "mine.png", title="mine"))
    assert drawn["title"] == "mine"
    assert [(p["title"], p["ylabel"], p["series"]) for p in drawn["panels"]] == [
        ("Accuracy", "test accuracy (fraction correct)", {"apf": 3}),
        ("Uplink traffic", "cumulative uplink (MB)", {"apf": 3}),
        ("Frozen parameters", "frozen scalars (%)", {"apf": 3})]


def test_results_read_a_run_that_stopped_before_its_summary(tmp_path):
    with pytest.raises(RuntimeError):
        run(tiny_config(rounds=4), tmp_path, callbacks=[CrashAfter(2)])
    res = apf_ray.Results(tmp_path)
    assert res.rounds().column("round").to_pylist() == [1, 2]
    with pytest.raises(FileNotFoundError, match="not finished"):
        res.summary  # noqa: B018


def test_results_name_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an apf-ray run folder"):
        apf_ray.Results(tmp_path)


def test_the_api_is_the_functions_the_command_line_uses():
    from apf_ray import config
    from apf_ray import run as run_module

    assert apf_ray.train is run_module.run and apf_ray.load_config is config.load_config
    assert set(apf_ray.__all__) >= {"load_config", "build_config", "train", "Results", "Callback"}
