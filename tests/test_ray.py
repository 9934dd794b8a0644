"""The Ray backend on a real local cluster: equivalence, failures, deadlines, resume, plug-ins."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml

from apf_ray.metrics import read_history
from apf_ray.resume import load_resume_point
from apf_ray.run import run
from tests.helpers import start_ray_backend, tiny_config

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


def test_ray_run_matches_the_inprocess_reference(local_ray, tmp_path):
    # Two actors summing their shares on the way in, and the in-process backend forming the same two
    # groups (apf_ray.edge.edge_groups): the same sums in the same order, so the same bits.
    cfg = tiny_config(rounds=3)
    summary = run(cfg, tmp_path / "ray", backend="ray")
    reference = run(cfg, tmp_path / "ref")
    ray_state, ref_state = load_resume_point(tmp_path / "ray"), load_resume_point(tmp_path / "ref")
    assert ray_state.server["params"].tobytes() == ref_state.server["params"].tobytes()
    assert summary["bytes_up"] == reference["bytes_up"]
    assert summary["bytes_down"] == reference["bytes_down"]
    assert summary["final_accuracy"] == pytest.approx(reference["final_accuracy"], abs=1e-6)
    assert (tmp_path / "ray" / "summary.json").is_file()


def test_killing_a_client_actor_mid_round_costs_that_round_one_client(local_ray, tmp_path):
    # 2000 steps with momentum 0.9 move the model by ~24x its norm: no norm bound, or that is a rejection
    # a generous deadline: on a loaded machine the replacement actor's start-up and 2000 steps are slow
    cfg = tiny_config("train.clients_per_round=2", "train.local_steps=2000", "cluster.min_clients=1",
                      "defence.max_update_ratio=null", "cluster.round_timeout_s=600", rounds=2)
    backend, info = start_ray_backend(cfg, tmp_path)
    try:
        pids = [a["pid"] for a in info["pools"]["cpu"]]
        assert len(pids) == 2
        round_ref = backend.server.run_round.remote()
        time.sleep(2.0)  # both actors are training their one client now
        os.kill(pids[0], signal.SIGKILL)
        rec = ray.get(round_ref, timeout=120).record
        assert (rec.clients_reported, rec.clients_dropped) == (1, 1)
        event = backend.run_round()
        assert event.record.clients_reported == 2  # the next round is whole again
        assert any("+1 actor" in e for e in event.pool_events)  # the dead actor was replaced
    finally:
        backend.close()


def test_a_client_past_the_deadline_is_dropped_without_hanging_the_round(local_ray, tmp_path):
    cfg = tiny_config("train.clients_per_round=2", "train.local_steps=5000", "cluster.round_timeout_s=3",
                      "cluster.min_clients=1", rounds=1)
    backend, _ = start_ray_backend(cfg, tmp_path)
    try:
        start = time.monotonic()
        rec = backend.run_round().record
        assert time.monotonic() - start < 30
        assert rec.clients_dropped == 2 and rec.clients_reported == 0
    finally:
        backend.close()


def test_failing_clients_never_take_down_a_ray_round(local_ray, tmp_path):
    cfg = tiny_config("faults.client_failure_prob=0.5", "cluster.min_clients=1", rounds=3)
    summary = run(cfg, tmp_path, backend="ray")
    assert summary["rounds"] == 3
    assert any(c["status"] == "error" for c in pq.read_table(tmp_path / "clients.parquet").to_pylist())


def _cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "apf_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)


def _checkpointed_round(run_dir: Path) -> int:
    try:
        return load_resume_point(run_dir).round
    except (FileNotFoundError, ValueError):
        return 0


def test_killed_driver_resumes_and_reproduces_the_uninterrupted_run(tmp_path):
    # ~1 s rounds, so the driver is still mid-run when the round-2 checkpoint appears; lr 0.01 keeps 150
    # steps' updates inside the default update-norm bound, so every round aggregates (the CLI exits 1 otherwise)
    cfg = tiny_config("output.checkpoint_every=2", "train.local_steps=150", "train.lr=0.01", rounds=6)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir = tmp_path / "run"
    proc = _cli("train", "--config", str(config_file), "--output", str(run_dir), "--quiet")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and _checkpointed_round(run_dir) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its server actor and its local Ray
        proc.wait(timeout=30)
    killed_at = _checkpointed_round(run_dir)
    assert 2 <= killed_at < 6
    resumed = _cli("train", "--resume", str(run_dir), "--quiet")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert [h.round for h in read_history(run_dir)] == [1, 2, 3, 4, 5, 6]
    run(cfg, tmp_path / "ref")
    state, ref = load_resume_point(run_dir), load_resume_point(tmp_path / "ref")
    np.testing.assert_allclose(state.server["params"], ref.server["params"], rtol=1e-6, atol=1e-7)
    assert [h.bytes_up for h in read_history(run_dir)] == [h.bytes_up for h in read_history(tmp_path / "ref")]


def test_compare_runs_every_variant_on_the_one_cluster(local_ray, tmp_path):
    from apf_ray.cli import main

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(rounds=2).to_dict()))
    node = ray.get_runtime_context().get_node_id()
    assert main(["compare", "--quiet", "--config", str(config_file), "--output", str(tmp_path / "cmp"),
                 "--strategies", "fedavg", "apf:threshold=0.95,alpha=0.5"]) == 0
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node  # not restarted
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["rounds"] for r in rows] == [2, 2] and rows[1]["bytes_up"] < rows[0]["bytes_up"]


def test_a_strategy_from_a_file_outside_the_package_runs_on_ray(tmp_path):
    """The plug-in lives outside the repository; the CLI's own local cluster inherits PYTHONPATH."""
    plugin = tmp_path / "plugins" / "my_median.py"
    plugin.parent.mkdir()
    plugin.write_text((REPO / "tests" / "plugins" / "median_strategy.py").read_text())
    config_file = tmp_path / "median.yaml"
    raw = tiny_config(rounds=2).to_dict()
    raw["strategy"] = {"name": "my_median:Median", "options": {"step": 0.5}}
    config_file.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin.parent), str(REPO)])}
    proc = _cli("train", "--config", str(config_file), "--output", str(tmp_path / "run"), "--quiet", env=env)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["config"]["strategy"]["name"] == "my_median:Median"


def test_a_local_run_listens_on_loopback_only_and_leaves_no_ray_process(tmp_path):
    """Every listening socket of the driver and its cluster (GCS, raylet, agents, actors) is on 127.0.0.1."""
    from tests.netcheck import alive, descendants, is_loopback, listening_sockets

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config("train.local_steps=15", rounds=6).to_dict()))
    run_dir = tmp_path / "run"
    proc = _cli("train", "--config", str(config_file), "--output", str(run_dir), "--quiet")
    try:
        deadline = time.monotonic() + 240
        journal = run_dir / "journal" / "rounds.jsonl"
        while time.monotonic() < deadline and proc.poll() is None and not journal.is_file():
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
        cluster = descendants(proc.pid)
        sockets = listening_sockets({proc.pid, *cluster})
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 0, out
    assert len({pid for pid, _, _ in sockets}) >= 4, sockets  # driver, GCS, raylet, actors at least
    assert [s for s in sockets if not is_loopback(s[1])] == []
    deadline = time.monotonic() + 30
    while alive(cluster) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(cluster) == [], "Ray processes outlived the run"
