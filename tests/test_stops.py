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
    """A tiny run's config and its file. lr 0.01 keeps the long rounds' updates (400 local steps) inside
    the default update-norm bound: every round aggregates, as a run that exits 0 must."""
    cfg = tiny_config("train.local_steps=15", "train.lr=0.01", "output.checkpoint_every=5", "output.tensorboard=false",
                      *overrides, rounds=rounds)
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


@pytest.mark.ray
def test_a_second_ctrl_c_on_ray_abandons_the_round_in_flight_with_the_stop_line_not_an_interrupt(tmp_path):
    # Ray re-raises an interrupted ray.get as a plain KeyboardInterrupt: it must still read as the second signal.
    # ~5 s a round here (2 s at 400 steps, which a fast machine finished before the second Ctrl-C came)
    _, cfg_file = _config(tmp_path, "train.local_steps=1000", "output.checkpoint_every=1", rounds=4)
    run_dir = tmp_path / "run"
    proc = _start("--config", str(cfg_file), "--output", str(run_dir))
    _wait_for_rounds(proc, run_dir, 1)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1)  # a person pressing Ctrl-C again, while the long round is in flight
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    done = load_resume_point(run_dir).round
    assert out.strip().splitlines()[-1] == ("abandoned the round in flight (second signal); stopped after round "
                                            f"{done}, the last checkpoint; resume with apf-ray train --resume "
                                            f"{run_dir}")
    assert "Traceback" not in out and done < 4


def test_the_run_restores_the_signal_handlers_it_found(tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    run(tiny_config(rounds=1), tmp_path)
    assert {sig: signal.getsignal(sig) for sig in before} == before


# ---------------------------------------------------------------------------------------- compare
COMPARED = ("final_accuracy", "best_accuracy", "bytes_up", "bytes_down", "frozen_fraction_final")


def _compare(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "apf_ray.cli", "compare", "--quiet", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _printed(capsys) -> str:
    """What a command printed, on either stream (error lines belong on stderr)."""
    captured = capsys.readouterr()
    return captured.out + captured.err


def _rows(out: Path) -> list[dict]:
    rows = json.loads((out / "compare.json").read_text())["rows"]
    return [{k: row[k] for k in ("variant", *COMPARED)} for row in rows]


def test_a_stopped_compare_claims_no_comparison_and_resume_reuses_finished_variants_and_equals_one_run(tmp_path):
    _, cfg_file = _config(tmp_path, rounds=12)
    out = tmp_path / "cmp"
    proc = _compare("--inprocess", "--config", str(cfg_file), "--output", str(out), "--strategies", "fedavg", "apf")
    _wait_for_rounds(proc, out / "apf", 2)  # the first variant finished, the second is under way
    os.kill(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, text
    stopped_at = load_resume_point(out / "apf").round
    assert text.strip().splitlines()[-1] == (f"stopped variant apf after round {stopped_at}; resume with "
                                             f"apf-ray compare --resume {out}")
    assert "Traceback" not in text and 2 <= stopped_at < 12 == len(read_history(out / "fedavg"))
    assert not (out / "compare.json").exists() and not (out / "compare.png").exists()
    assert json.loads((out / "apf" / "summary.json").read_text())["stopped"]["round"] == stopped_at
    finished = (out / "fedavg" / "summary.json").stat().st_mtime_ns

    resumed = _compare("--inprocess", "--resume", str(out))
    text, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, text
    assert (out / "fedavg" / "summary.json").stat().st_mtime_ns == finished  # reused, not trained again
    assert (out / "compare.png").is_file()
    reference = _compare("--inprocess", "--config", str(cfg_file), "--output", str(tmp_path / "ref"),
                         "--strategies", "fedavg", "apf")
    assert reference.wait(timeout=300) == 0
    assert _rows(out) == _rows(tmp_path / "ref")


def test_a_second_signal_stops_a_compare_at_once_and_resume_still_finishes_it(tmp_path):
    _, cfg_file = _config(tmp_path, "train.local_steps=400", "output.checkpoint_every=1", rounds=3)
    out = tmp_path / "cmp"
    proc = _compare("--inprocess", "--config", str(cfg_file), "--output", str(out), "--strategies", "apf")
    _wait_for_rounds(proc, out / "apf", 1)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGINT)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text
    done = len(read_history(out / "apf"))
    assert text.strip().splitlines()[-1] in (  # the first signal came between rounds: nothing left to abandon
        f"abandoned the round in flight (second signal); stopped variant apf after round {done}, the last "
        f"checkpoint; resume with apf-ray compare --resume {out}",
        f"stopped variant apf after round {done}; resume with apf-ray compare --resume {out}")
    assert "Traceback" not in text and not (out / "compare.json").exists()
    resumed = _compare("--inprocess", "--resume", str(out))
    text, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and [r["variant"] for r in _rows(out)] == ["apf"], text


@pytest.mark.parametrize("extra", [["--strategies", "apf"], ["--set", "train.rounds=9"], ["--overwrite"]])
def test_compare_resume_keeps_the_saved_variants_and_config(tmp_path, extra, capsys):
    from apf_ray.cli import main
    from apf_ray.variants import save_plan

    save_plan(tmp_path, tiny_config().to_dict(), ["fedavg"])
    assert main(["compare", "--inprocess", "--resume", str(tmp_path), *extra]) == 2
    err = _printed(capsys)
    assert err.startswith(f"error: {extra[0]} cannot be used with --resume") and err.count("\n") == 1


def test_compare_resume_of_a_folder_without_a_comparison_says_so(tmp_path, capsys):
    from apf_ray.cli import main

    assert main(["compare", "--inprocess", "--resume", str(tmp_path)]) == 2
    assert _printed(capsys) == (f"error: {tmp_path} holds no comparison to resume (no compare-plan.yaml, "
                                       "which apf-ray compare writes before its first variant)\n")


@pytest.mark.ray
def test_ctrl_c_of_a_compare_on_ray_stops_its_cluster_and_the_resumed_comparison_equals_one_run(tmp_path):
    _, cfg_file = _config(tmp_path, rounds=8)
    out = tmp_path / "cmp"
    proc = _compare("--config", str(cfg_file), "--output", str(out), "--strategies", "fedavg", "apf")
    _wait_for_rounds(proc, out / "apf", 2)
    os.killpg(proc.pid, signal.SIGINT)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text
    stopped_at = load_resume_point(out / "apf").round
    assert f"stopped variant apf after round {stopped_at}; resume with apf-ray compare --resume {out}" in text
    assert "Traceback" not in text and not (out / "compare.json").exists()
    deadline = time.monotonic() + 30
    while _session_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_alive(proc.pid), "the driver's Ray processes outlived it"

    resumed = _compare("--inprocess", "--resume", str(out))  # Ray and in-process runs are the same runs
    text, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, text
    reference = _compare("--inprocess", "--config", str(cfg_file), "--output", str(tmp_path / "ref"),
                         "--strategies", "fedavg", "apf")
    assert reference.wait(timeout=300) == 0
    ours, ref = _rows(out), _rows(tmp_path / "ref")
    assert [(r["variant"], r["bytes_up"], r["bytes_down"]) for r in ours] == [
        (r["variant"], r["bytes_up"], r["bytes_down"]) for r in ref]
    np.testing.assert_allclose([r["final_accuracy"] for r in ours], [r["final_accuracy"] for r in ref], atol=1e-6)


# ---------------------------------------------------------------------------------------- reproduce
def test_ctrl_c_of_reproduce_checkpoints_each_run_in_flight_and_resume_continues_it(tmp_path):
    out = tmp_path / "rep"
    proc = subprocess.Popen([sys.executable, "-m", "apf_ray.cli", "reproduce", "--quick", "--only", "strawmen",
                             "--jobs", "1", "--output", str(out), "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_rounds(proc, out / "runs" / "lenet5-fedavg", 2)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the driver's group; it passes the signal on to its worker once
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, text
    run_dir = out / "runs" / "lenet5-fedavg"
    stopped_at = len(read_history(run_dir))
    assert load_resume_point(run_dir).round == stopped_at  # the round in flight was finished and checkpointed
    assert text.strip().splitlines()[-1] == (f"stopped lenet5-fedavg after round {stopped_at} (0 of 4 runs done); "
                                             f"resume with apf-ray reproduce --resume {out}")
    assert "Traceback" not in text and not (out / "report.md").exists()

    resumed = subprocess.run([sys.executable, "-m", "apf_ray.cli", "reproduce", "--resume", str(out), "--quiet"],
                             cwd=REPO, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"lenet5-fedavg: resuming after round {stopped_at}" in (out / "runs" / "lenet5-fedavg.log").read_text()
    first, second = json.loads((out / "runs" / "invocations.json").read_text())
    assert first["interrupted"] and not second["interrupted"]
    assert second["command"] == f"apf-ray reproduce --resume {out} --quiet"
    data = json.loads((out / "reproduce.json").read_text())
    assert {k for k, r in data["runs"].items() if r["status"] == "done"} == {
        "lenet5-fedavg", "lenet5-apf", "lenet5-partial-sync", "lenet5-permanent"}


def test_reproduce_resume_repeats_the_saved_invocation_only(tmp_path, capsys):
    from apf_ray.cli import main

    assert main(["reproduce", "--resume", str(tmp_path)]) == 2
    assert _printed(capsys).startswith(f"error: {tmp_path} holds no apf-ray reproduce to resume")
    assert main(["reproduce", "--resume", str(tmp_path), "--only", "lenet5"]) == 2
    assert _printed(capsys) == (f"error: --only cannot be used with --resume: it repeats the invocation "
                                       f"saved in {tmp_path}\n")


AFTER_THE_STOP = """
import os, signal, sys, threading, time
from pathlib import Path
from apf_ray import cli

out = Path(sys.argv[2])

def first_signal():  # Ctrl-C once the first round is in the journal
    while not (out / "journal" / "rounds.jsonl").is_file():
        time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGINT)

threading.Thread(target=first_signal, daemon=True).start()
code = cli.main(["train", "--inprocess", "--quiet", "--config", sys.argv[1], "--output", str(out)], as_program=True)
os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C that comes after the stop was reported
time.sleep(0.5)
print("exited with", code)
"""


def test_a_signal_after_a_stop_was_reported_does_not_kill_the_exiting_program(tmp_path):
    _, cfg_file = _config(tmp_path, rounds=50)
    proc = subprocess.run([sys.executable, "-c", AFTER_THE_STOP, str(cfg_file), str(tmp_path / "run")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "exited with 130", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert load_resume_point(tmp_path / "run").round < 50
