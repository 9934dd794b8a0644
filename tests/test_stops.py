"""Clean stops: SIGINT and SIGTERM checkpoint the interrupted round, print how to resume, and lose nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from apf_ray.metrics import read_history
from apf_ray.resume import load_resume_point
from apf_ray.run import run
from tests.helpers import tiny_config
from tests.netcheck import descendants

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, *overrides: str, rounds: int = 20):
    cfg = tiny_config("train.local_steps=15", "output.checkpoint_every=5", "output.tensorboard=false", *overrides,
                      rounds=rounds)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return cfg, path


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "apf_ray.cli", "train", "--quiet", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_rounds(proc: subprocess.Popen, run_dir: Path, rounds: int, timeout_s: float = 300) -> None:
    journal = run_dir / "journal" / "rounds.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= rounds:
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run did not reach round {rounds}: {proc.communicate()[0]}")


def _session_alive(sid: int) -> list[int]:
    """Live processes of session ``sid`` (the driver was started with start_new_session)."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                alive.append(int(entry))
    return alive


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_checkpoints_the_interrupted_round_and_resume_reproduces_the_run_exactly(tmp_path, sig):
    cfg, cfg_file = _config(tmp_path)
    run_dir = tmp_path / "run"
    proc = _start("--inprocess", "--config", str(cfg_file), "--output", str(run_dir))
    _wait_for_rounds(proc, run_dir, 2)
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, out
    stopped_at = len(read_history(run_dir))
    assert 2 <= stopped_at < cfg.train.rounds
    expected = f"stopped after round {stopped_at}; resume with apf-ray train --resume {run_dir}"
    assert out.strip().splitlines()[-1] == expected
    assert "Traceback" not in out
    assert load_resume_point(run_dir).round == stopped_at
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == {"round": stopped_at, "signal": int(sig)}

    resumed = _start("--inprocess", "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    run(cfg, tmp_path / "reference")
    assert (load_resume_point(run_dir).server["params"].tobytes()
            == load_resume_point(tmp_path / "reference").server["params"].tobytes())
    assert read_history(run_dir) and [
        (r.round, r.bytes_up, r.bytes_down, r.test_accuracy) for r in read_history(run_dir)
    ] == [(r.round, r.bytes_up, r.bytes_down, r.test_accuracy) for r in read_history(tmp_path / "reference")]


def test_a_second_signal_abandons_the_round_in_flight_and_keeps_the_last_checkpoint(tmp_path):
    cfg, cfg_file = _config(tmp_path, "train.local_steps=400", "output.checkpoint_every=1", rounds=6)
    run_dir = tmp_path / "run"
    proc = _start("--inprocess", "--config", str(cfg_file), "--output", str(run_dir))
    _wait_for_rounds(proc, run_dir, 1)
    os.kill(proc.pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out
    assert "abandoned the round in flight" in out and "Traceback" not in out
    done = len(read_history(run_dir))
    assert load_resume_point(run_dir).round == done < cfg.train.rounds
    assert f"stopped after round {done}" in out


@pytest.mark.ray
def test_ctrl_c_on_ray_checkpoints_stops_the_cluster_and_resumes_the_same_run(tmp_path):
    cfg, cfg_file = _config(tmp_path, rounds=12)
    run_dir = tmp_path / "run"
    proc = _start("--config", str(cfg_file), "--output", str(run_dir))
    _wait_for_rounds(proc, run_dir, 2)
    assert descendants(proc.pid), "a local Ray cluster runs under the driver"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    stopped_at = len(read_history(run_dir))
    assert f"stopped after round {stopped_at}; resume with apf-ray train --resume {run_dir}" in out
    assert "Traceback" not in out and load_resume_point(run_dir).round == stopped_at
    deadline = time.monotonic() + 30
    while _session_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_alive(proc.pid), "the driver's Ray processes outlived it"

    resumed = _start("--inprocess", "--resume", str(run_dir))
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    run(cfg, tmp_path / "reference")
    np.testing.assert_allclose(load_resume_point(run_dir).server["params"],
                               load_resume_point(tmp_path / "reference").server["params"], rtol=1e-6, atol=1e-7)
    assert [r.bytes_up for r in read_history(run_dir)] == [r.bytes_up for r in read_history(tmp_path / "reference")]


def test_the_run_restores_the_signal_handlers_it_found(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    run(tiny_config(rounds=1), tmp_path)
    assert {sig: signal.getsignal(sig) for sig in before} == before
