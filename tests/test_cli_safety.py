"""Mistakes fail fast with one line, and nothing is lost: bad inputs, existing runs, resume rules, checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from apf_ray.cli import main
from apf_ray.errors import SetupError
from apf_ray.resume import check_resume_config, load_resume_point
from apf_ray.run import run
from tests.helpers import tiny_config
from tests.test_checkpoint import _rewrite_manifest, _Trap
from tests.test_data import write_idx, write_mnist_dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-round in-process run checkpointed after each round; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("finished")
    cfg = tiny_config("output.checkpoint_every=1", rounds=2)
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    run(cfg, root / "run")
    return root / "run"


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "run"))


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


# ---- bad inputs on Ray: one error line, exit 2, no run folder -----------------------------------
def _mnist(tmp_path: Path, damage: str) -> list[str]:
    directory = write_mnist_dir(tmp_path / "data", n_train=40, n_test=10)
    if damage == "truncated_gz":
        gz = directory / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:-20])
    elif damage == "magic":
        (directory / "t10k-labels-idx1-ubyte").unlink()
        write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(10) % 10, magic=0x803)
    elif damage == "missing":
        shutil.rmtree(directory)
    return ["--set", "data.dataset=mnist_idx", "--set", f"data.options.path={directory}",
            "--set", "data.num_clients=4", "--set", "train.clients_per_round=2"]


BAD_INPUTS = {
    "unknown model": lambda tmp: ["--set", "model.name=no_such_net"],
    "missing dataset folder": lambda tmp: _mnist(tmp, "missing"),
    "truncated .gz": lambda tmp: _mnist(tmp, "truncated_gz"),
    "wrong IDX magic": lambda tmp: _mnist(tmp, "magic"),
    "pool no node can host": lambda tmp: ["--set", "cluster.pools=[{name: big, num_cpus: 4096}]"],
    "bad config value": lambda tmp: ["--set", "train.lr=-1"],
}
EXPECTED = {
    "unknown model": "unknown model 'no_such_net'",
    "missing dataset folder": "does not exist",
    "truncated .gz": "not a valid gzip file",
    "wrong IDX magic": "IDX magic number is 0x00000803",
    "pool no node can host": "cluster.pools[big] asks for {'CPU': 4096.0}",
    "bad config value": "train.lr",
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apf_ray.cli", "train", "--quiet", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)


def _one_error_line(proc: subprocess.CompletedProcess, expected: str) -> None:
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_a_bad_input_on_ray_is_one_error_line_with_exit_2_and_no_run_folder(tmp_path, case):
    out = tmp_path / "out"
    proc = _cli("--output", str(out), *BAD_INPUTS[case](tmp_path))
    _one_error_line(proc, EXPECTED[case])
    assert not out.exists()


def test_resume_on_ray_with_a_different_model_is_one_error_line_and_touches_nothing(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    proc = _cli("--resume", str(run_dir), "--set", "model.name=resnet18")
    _one_error_line(proc, "--resume keeps the run's meaning: model.name cannot change (was 'lenet5', "
                          "--set asks 'resnet18')")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("override, field", [
    ("strategy.name=fedavg", "strategy.name"),
    ("seed=3", "seed"),
    ("data.num_clients=12", "data.num_clients"),
    ("strategy.options.threshold=0.3", "strategy.options.threshold"),
    ("output.dir=/elsewhere", "output.dir"),
])
def test_resume_refuses_a_change_of_meaning_naming_the_field(finished_run, tmp_path, capsys, override, field):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    assert main(["train", "--inprocess", "--resume", str(run_dir), "--set", override]) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"error: --resume keeps the run's meaning: {field} cannot change")
    assert "--set asks" in out[0]
    assert _snapshot(run_dir) == before


def test_resume_with_a_config_file_or_another_output_is_refused_naming_the_option(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    assert main(["train", "--inprocess", "--resume", str(run_dir), "--config",
                 str(finished_run.parent / "tiny.yaml")]) == 2
    assert "--config cannot be used with --resume" in capsys.readouterr().err
    assert main(["train", "--inprocess", "--resume", str(run_dir), "--output", str(tmp_path / "other")]) == 2
    assert f"--output {tmp_path / 'other'} differs from --resume" in capsys.readouterr().err
    assert main(["train", "--inprocess", "--resume", str(run_dir), "--set", "train.rounds=1"]) == 2
    assert "train.rounds (1) is below the 2 rounds already done" in capsys.readouterr().err


def test_resume_accepts_more_rounds_and_cluster_output_and_fault_settings(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    assert main(["train", "--inprocess", "--quiet", "--resume", str(run_dir), "--set", "train.rounds=3",
                 "--set", "train.eval_every=2", "--set", "cluster.round_timeout_s=30",
                 "--set", "output.checkpoint_every=3", "--set", "faults.client_failure_prob=0.1"]) == 0
    assert load_resume_point(run_dir).round == 3
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["strategy"]["name"] == "apf" and saved["train"]["rounds"] == 3


def test_check_resume_config_names_the_first_changed_field():
    saved = tiny_config().to_dict()
    check_resume_config(saved, tiny_config("train.rounds=9", "cluster.min_clients=1"), 4)
    with pytest.raises(ValueError, match=r"model\.options\.width cannot change \(was None, now 3\)"):
        check_resume_config(saved, tiny_config("model.options={width: 3}"), 4)


def test_ignored_options_are_reported(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(rounds=1).to_dict()))
    assert main(["train", "--inprocess", "--quiet", "--config", str(cfg_file), "--output", str(tmp_path / "r"),
                 "--address", "127.0.0.1:1"]) == 0
    assert "note: --address 127.0.0.1:1 is ignored with --inprocess" in capsys.readouterr().out


# ---- --output onto an existing run -------------------------------------------------------------
def test_output_onto_an_existing_run_is_refused_and_nothing_changes(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    assert main(["train", "--inprocess", "--quiet", "--config", str(finished_run.parent / "tiny.yaml"),
                 "--output", str(run_dir)]) == 2
    out = capsys.readouterr().err
    assert f"{run_dir} already holds a run" in out and f"--resume {run_dir}" in out and "--overwrite" in out
    assert _snapshot(run_dir) == before


def test_overwrite_replaces_only_the_runs_outputs_and_says_what_it_removed(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    cfg = tiny_config("strategy.name=fedavg", rounds=1)
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["train", "--inprocess", "--quiet", "--config", str(tmp_path / "f.yaml"), "--output", str(run_dir),
                 "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "--overwrite removed the earlier run's config.yaml" in out and "checkpoints" in out
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["round-00000001"]
    assert len((run_dir / "journal" / "rounds.jsonl").read_text().splitlines()) == 1


def test_a_failed_overwrite_keeps_the_old_run(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    before = _snapshot(run_dir)
    with pytest.raises(SetupError, match="unknown model"):
        run(tiny_config("model.name=no_such_net"), run_dir, overwrite=True)
    assert _snapshot(run_dir) == before


# ---- resume points -------------------------------------------------------------------------------
def test_a_resume_whose_checkpoint_does_not_fit_the_config_fails_before_the_backend_starts(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    point = load_resume_point(run_dir)
    point.server["params"] = point.server["params"][:-1]
    with pytest.raises(SetupError, match=r"does not fit the configured run: checkpoint holds 61705 parameters"):
        run(tiny_config("output.checkpoint_every=1", rounds=3), run_dir, resume=point)


def test_a_crafted_checkpoint_cannot_run_code_on_resume_and_a_damaged_newest_falls_back(finished_run, tmp_path,
                                                                                       capsys):
    run_dir = _copy(finished_run, tmp_path)
    newest = run_dir / "checkpoints" / "round-00000002"
    marker = tmp_path / "marker"
    with np.load(newest / "arrays.npz") as npz:
        members = {name: npz[name] for name in npz.files}
    members["a0"] = np.array([_Trap(marker)], dtype=object)  # every other member as saved
    with (newest / "arrays.npz").open("wb") as f:
        np.savez(f, **members)
    _rewrite_manifest(newest)  # what an attacker would do: the checksums match the crafted file
    assert main(["train", "--inprocess", "--resume", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint round-00000002 is damaged" in out and "dtype object" in out
    assert "resuming" in out and "after round 1" in out
    assert not marker.exists()
    resumed = load_resume_point(run_dir)
    assert resumed.round == 2
    assert resumed.server["params"].tobytes() == load_resume_point(finished_run).server["params"].tobytes()


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one_on_resume(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    arrays = run_dir / "checkpoints" / "round-00000002" / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])
    assert main(["train", "--inprocess", "--quiet", "--resume", str(run_dir)]) == 0
    assert "arrays.npz is truncated" in capsys.readouterr().out
    assert (load_resume_point(run_dir).server["params"].tobytes()
            == load_resume_point(finished_run).server["params"].tobytes())


def test_no_readable_checkpoint_is_one_error_line(finished_run, tmp_path, capsys):
    run_dir = _copy(finished_run, tmp_path)
    for ckpt in (run_dir / "checkpoints").iterdir():
        (ckpt / "MANIFEST.json").unlink()
    assert main(["train", "--inprocess", "--resume", str(run_dir)]) == 2
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("error: ") and "no readable checkpoint" in out[0]


@pytest.mark.ray
def test_an_error_in_the_server_actors_set_up_is_unwrapped_into_one_line(local_ray, finished_run, tmp_path):
    from actors.backend import RayBackend
    from apf_ray.workload import build_workload

    cfg = tiny_config("output.checkpoint_every=1", rounds=2)
    point = load_resume_point(finished_run)
    point.server["params"] = point.server["params"][:-1]
    backend = RayBackend()
    try:
        with pytest.raises(SetupError) as info:  # bypasses run()'s driver-side check on purpose
            backend.start(cfg, tmp_path / "r", build_workload(cfg), point)
    finally:
        backend.close()
    assert str(info.value) == ("server set-up failed: checkpoint holds 61705 parameters, the configured model "
                               "has 61706")
