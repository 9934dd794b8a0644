"""Output folders: one writer at a time, bad paths refused up front, --overwrite removes only apf-ray's files.

Real `apf-ray` processes (``python -m apf_ray.cli``), real flock locks, real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from apf_ray.metrics import read_history
from apf_ray.outputs import FILE_LIST, LOCK_FILE, OutputClaim, clear_run, recorded
from apf_ray.run import run
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apf_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "apf_ray.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _config_file(tmp_path: Path, *overrides: str, rounds: int = 2, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_config(*overrides, rounds=rounds).to_dict()))
    return path


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints (it must be the only one, and no traceback)."""
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, out
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    assert out.startswith("error: "), out
    return out


def _holder_pid(run_dir: Path, proc: subprocess.Popen, timeout_s: float = 300) -> int:
    """Wait until ``proc`` holds ``run_dir`` and has trained a round; the PID its lock file names."""
    lock, journal = run_dir / LOCK_FILE, run_dir / "journal" / "rounds.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.is_file() and lock.read_text() and journal.is_file() and journal.read_text():
            return json.loads(lock.read_text())["pid"]
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the first run never held {run_dir}: {proc.communicate()[0]}")


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-round in-process run with TensorBoard, checkpointed after each round; tests copy it."""
    root = tmp_path_factory.mktemp("finished")
    run(tiny_config("output.checkpoint_every=1", rounds=2), root / "run")
    return root / "run"


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


# ---- one writer per folder -------------------------------------------------------------------------
def test_a_second_train_on_a_folder_in_use_is_refused_naming_the_holder_and_the_first_run_is_intact(tmp_path):
    cfg = _config_file(tmp_path, "train.local_steps=15", "output.checkpoint_every=1", rounds=60)
    other = _config_file(tmp_path, "strategy.name=fedavg", rounds=2, name="fedavg.yaml")
    run_dir = tmp_path / "run"
    first = _start("train", "--inprocess", "--quiet", "--config", str(cfg), "--output", str(run_dir))
    assert _holder_pid(run_dir, first) == first.pid

    second = _cli("train", "--inprocess", "--quiet", "--config", str(other), "--output", str(run_dir))
    line = _error_line(second)
    assert f"{run_dir} is in use by 'apf-ray train --inprocess --quiet --config {cfg}" in line
    assert f"(PID {first.pid} on " in line and "since " in line

    first.send_signal(signal.SIGTERM)  # the first stops cleanly: the lock goes with it
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 143, out
    assert not (run_dir / LOCK_FILE).exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["strategy"]["name"] == "apf"
    assert {r.round for r in read_history(run_dir)} == set(range(1, len(read_history(run_dir)) + 1))
    with OutputClaim(run_dir):  # free again
        pass


def test_a_killed_holder_does_not_block_the_folder_and_overwrite_replaces_its_run(tmp_path):
    cfg = _config_file(tmp_path, "train.local_steps=15", "output.checkpoint_every=1", rounds=60)
    run_dir = tmp_path / "run"
    first = _start("train", "--inprocess", "--quiet", "--config", str(cfg), "--output", str(run_dir))
    _holder_pid(run_dir, first)
    first.kill()  # SIGKILL: no clean-up runs; the kernel drops the flock, the lock file stays
    first.communicate(timeout=60)
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == first.pid

    again = _cli("train", "--inprocess", "--quiet", "--config", str(_config_file(tmp_path, rounds=1, name="one.yaml")),
                 "--output", str(run_dir), "--overwrite")
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(read_history(run_dir)) == 1 and not (run_dir / LOCK_FILE).exists()


def test_one_process_cannot_claim_a_folder_twice_and_a_claim_that_fails_leaves_nothing(tmp_path):
    folder = tmp_path / "a" / "b"
    with OutputClaim(folder, command="first"):
        with pytest.raises(ValueError, match=r"is in use by 'first' \(PID \d+ on .*, since .* UTC\)"):
            OutputClaim(folder).__enter__()
        assert folder.is_dir()
    assert not (tmp_path / "a").exists()  # it created both folders, and nothing was written into them


@pytest.mark.ray
def test_on_ray_a_second_train_is_refused_before_it_starts_a_cluster(tmp_path):
    cfg = _config_file(tmp_path, "train.local_steps=15", "output.checkpoint_every=1", rounds=60)
    run_dir = tmp_path / "run"
    first = _start("train", "--quiet", "--config", str(cfg), "--output", str(run_dir))
    holder = _holder_pid(run_dir, first)
    # Were it to start a cluster, the second would fail on the dead address, not on the folder.
    second = _cli("train", "--quiet", "--config", str(cfg), "--output", str(run_dir), "--address", "127.0.0.1:1")
    assert f"is in use by 'apf-ray train --quiet --config {cfg}" in _error_line(second)
    assert f"PID {holder} on" in second.stdout + second.stderr
    os.killpg(first.pid, signal.SIGINT)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 130, out
    assert not (run_dir / LOCK_FILE).exists()


# ---- --overwrite removes exactly the earlier run's files ----------------------------------------------
def test_overwrite_removes_the_files_the_earlier_run_listed_and_keeps_the_users(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path / "run")
    assert {"config.yaml", "journal/rounds.jsonl", "checkpoints/round-00000002/state.json"} <= set(recorded(run_dir))
    mine = {"journal/2026.txt": "my journal", "checkpoints/mine.txt": "mine", "notes.txt": "notes"}
    for name, text in mine.items():
        (run_dir / name).write_text(text)
    cfg = _config_file(tmp_path, "strategy.name=fedavg", "output.tensorboard=false", rounds=1)
    proc = _cli("train", "--inprocess", "--quiet", "--config", str(cfg), "--output", str(run_dir), "--overwrite")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--overwrite removed the earlier run's config.yaml" in proc.stdout
    for name, text in mine.items():
        assert (run_dir / name).read_text() == text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["mine.txt", "round-00000001"]
    assert sorted(p.name for p in (run_dir / "journal").iterdir()) == ["2026.txt", "clients.jsonl", "rounds.jsonl"]
    assert not (run_dir / "tensorboard").exists()  # apf-ray made it, and nothing of the user's was in it
    assert [r.round for r in read_history(run_dir)] == [1]
    assert "tensorboard" not in recorded(run_dir) and "journal/2026.txt" not in recorded(run_dir)


def test_overwrite_refuses_a_run_whose_files_are_not_listed(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path / "run")
    (run_dir / FILE_LIST).unlink()  # as an apf-ray older than the list left it
    before = _snapshot(run_dir)
    cfg = _config_file(tmp_path, rounds=1)
    line = _error_line(_cli("train", "--inprocess", "--config", str(cfg), "--output", str(run_dir), "--overwrite"))
    assert f"{run_dir} holds a run without a list of the files apf-ray wrote" in line
    assert _snapshot(run_dir) == before


def test_a_list_that_points_out_of_the_folder_or_through_a_link_removes_nothing_there(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (outside / "rounds.jsonl").write_text("keep")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "journal").symlink_to(outside)  # a listed folder replaced by a link
    (folder / "config.yaml").write_text("written by apf-ray")
    (folder / FILE_LIST).write_text(json.dumps({"files": ["../outside/keep.txt", str(outside / "keep.txt"),
                                                          "journal", "journal/rounds.jsonl", "config.yaml"]}))
    assert clear_run(folder) == ["config.yaml"]
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt", "rounds.jsonl"]
    assert (folder / "journal").is_symlink() and not (folder / FILE_LIST).exists()


def test_a_damaged_list_refuses_overwrite_naming_it(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path / "run")
    (run_dir / FILE_LIST).write_text("{not json")
    before = _snapshot(run_dir)
    cfg = _config_file(tmp_path, rounds=1)
    line = _error_line(_cli("train", "--inprocess", "--config", str(cfg), "--output", str(run_dir), "--overwrite"))
    assert f"{run_dir / FILE_LIST} is damaged" in line
    assert _snapshot(run_dir) == before


# ---- unusable outputs: exit 2, one line naming the path, before data or cluster -------------------------
def _read_only_folder(tmp_path: Path) -> tuple[Path, str]:
    """A folder no one may create entries in: a chmod'ed one, or under root (chmod does not stop root) sysfs."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        return locked / "x", f"permission denied: {locked / 'x'}"
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root, and there is no sysfs here to stand for a folder root cannot write")
    return Path("/sys/apf-ray-test-output"), "/sys/apf-ray-test-output"


BAD_OUTPUTS = {
    "an existing file": lambda tmp: (tmp / "file.txt", f"{tmp / 'file.txt'} is a file, not a folder"),
    "a path under a file": lambda tmp: (tmp / "file.txt" / "x", f"{tmp / 'file.txt'} is a file, not a folder"),
    "a read-only folder": _read_only_folder,
    "too long a name": lambda tmp: (tmp / ("n" * 300), "longer than the file system allows (300 bytes)"),
}


@pytest.mark.parametrize("case", BAD_OUTPUTS)
def test_an_unusable_output_fails_before_the_data_loads_or_a_cluster_starts(tmp_path, case):
    (tmp_path / "file.txt").write_text("a user's file")
    output, reason = BAD_OUTPUTS[case](tmp_path)
    # Missing data and a dead address: either would be the error if the output were checked later.
    proc = _cli("train", "--set", "data.dataset=mnist_idx", "--set", f"data.options.path={tmp_path / 'nothing'}",
                "--address", "127.0.0.1:1", "--output", str(output), timeout=120)
    line = _error_line(proc)
    assert line.startswith("error: output folder ") and reason in line
    assert (tmp_path / "file.txt").read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "locked") == ["file.txt"]


@pytest.mark.parametrize("command", [["compare", "--inprocess"], ["tune", "--config", "tune_configs/tiny.yaml"],
                                     ["reproduce", "--quick", "--report-only"]], ids=lambda c: c[0])
def test_every_command_refuses_an_output_under_a_file(tmp_path, command):
    (tmp_path / "file.txt").write_text("a user's file")
    line = _error_line(_cli(*command, "--output", str(tmp_path / "file.txt" / "out"), timeout=120))
    assert f"{tmp_path / 'file.txt'} is a file, not a folder" in line


@pytest.mark.parametrize(("name", "says"), [("../../x", "not a name: use letters, digits"),
                                            ("n" * 300, "a name has at most 100 characters, got 300")])
def test_a_name_is_a_name_not_a_path(tmp_path, name, says):
    line = _error_line(_cli("train", "--inprocess", "--set", f"name={name}", cwd=tmp_path))
    assert "name" in line and says in line
    assert list(tmp_path.iterdir()) == []


def test_a_search_name_is_a_name_too(tmp_path):
    line = _error_line(_cli("tune", "--config", str(REPO / "tune_configs" / "tiny.yaml"), "--set", "name=../x",
                            cwd=tmp_path))
    assert "name: not a name" in line
    assert list(tmp_path.iterdir()) == []


# ---- tune and train keep to their own kind of folder -----------------------------------------------
def _search_folder(tmp_path: Path, finished: bool) -> Path:
    """A folder as a search leaves it (what tells it apart: search.json, and summary.json once finished)."""
    folder = tmp_path / "search"
    (folder / "trials").mkdir(parents=True)
    (folder / "search.json").write_text("{}")
    if finished:
        (folder / "summary.json").write_text("{}")
    return folder


def test_tune_refuses_a_folder_holding_a_run(finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path / "run")
    before = _snapshot(run_dir)
    line = _error_line(_cli("tune", "--config", "tune_configs/tiny.yaml", "--output", str(run_dir)))
    assert f"{run_dir} holds a run (config.yaml, summary.json" in line and "not a search" in line
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "unfinished"])
def test_tune_refuses_a_folder_holding_a_search_and_points_to_resume(tmp_path, finished):
    folder = _search_folder(tmp_path, finished)
    before = _snapshot(folder)
    line = _error_line(_cli("tune", "--config", "tune_configs/tiny.yaml", "--output", str(folder)))
    assert (f"{folder} holds a finished search" if finished else f"tune --resume {folder}") in line
    assert _snapshot(folder) == before


@pytest.mark.parametrize("command", ["train", "compare"])
def test_train_and_compare_refuse_a_folder_holding_a_search(tmp_path, command):
    folder = _search_folder(tmp_path, finished=True)
    before = _snapshot(folder)
    line = _error_line(_cli(command, "--inprocess", "--output", str(folder), "--overwrite"))
    assert f"{folder} holds a Ray Tune search (search.json)" in line
    assert _snapshot(folder) == before
