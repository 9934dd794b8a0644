"""The Ray layer on a real local cluster: equivalence, failures, deadlines, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import ray
import yaml

from actors.driver import start_server, train_on_ray
from apf_ray.run import load_checkpoint, run_inprocess
from tests.helpers import tiny_config

pytestmark = pytest.mark.ray


def test_ray_run_matches_the_inprocess_reference(local_ray, tmp_path):
    cfg = tiny_config(rounds=3)
    summary = train_on_ray(cfg, tmp_path / "ray")
    reference = run_inprocess(cfg, tmp_path / "ref")
    _, ray_state = load_checkpoint(tmp_path / "ray")
    _, ref_state = load_checkpoint(tmp_path / "ref")
    np.testing.assert_allclose(ray_state["params"], ref_state["params"], rtol=1e-6, atol=1e-7)
    assert summary["bytes_up"] == reference["bytes_up"]
    assert summary["bytes_down"] == reference["bytes_down"]
    assert summary["final_accuracy"] == pytest.approx(reference["final_accuracy"], abs=1e-6)
    assert (tmp_path / "ray" / "summary.json").is_file()


def test_killing_a_client_actor_mid_round_costs_that_round_one_client(local_ray, tmp_path):
    cfg = tiny_config("train.clients_per_round=2", "train.local_steps=2000", "cluster.min_clients=1", rounds=2)
    server, info = start_server(cfg, tmp_path)
    try:
        pids = [a["pid"] for a in info["pools"]["cpu"]]
        assert len(pids) == 2
        round_ref = server.run_round.remote()
        time.sleep(2.0)  # both actors are training their one client now
        os.kill(pids[0], signal.SIGKILL)
        rec, _ = ray.get(round_ref, timeout=120)
        assert (rec.clients_reported, rec.clients_dropped) == (1, 1)
        rec2, events = ray.get(server.run_round.remote(), timeout=180)
        assert rec2.clients_reported == 2  # the next round is whole again
        assert any("+1 actor" in e for e in events)  # the dead actor was replaced
    finally:
        ray.kill(server)


def test_a_client_past_the_deadline_is_dropped_without_hanging_the_round(local_ray, tmp_path):
    cfg = tiny_config("train.clients_per_round=2", "train.local_steps=5000", "cluster.round_timeout_s=3",
                      "cluster.min_clients=1", rounds=1)
    server, _ = start_server(cfg, tmp_path)
    try:
        start = time.monotonic()
        rec, _ = ray.get(server.run_round.remote(), timeout=60)
        assert time.monotonic() - start < 30
        assert rec.clients_dropped == 2 and rec.clients_reported == 0
    finally:
        ray.kill(server)


def test_failing_clients_never_take_down_a_ray_round(local_ray, tmp_path):
    cfg = tiny_config("faults.client_failure_prob=0.5", "cluster.min_clients=1", rounds=3)
    summary = train_on_ray(cfg, tmp_path)
    assert summary["rounds"] == 3
    _, state = load_checkpoint(tmp_path)
    assert any(c["status"] == "error" for c in state["client_history"])


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "apf_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_driver_resumes_and_reproduces_the_uninterrupted_run(tmp_path):
    # ~1 s rounds, so the driver is still mid-run when the round-2 checkpoint appears
    cfg = tiny_config("output.checkpoint_every=2", "train.local_steps=150", rounds=6)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    run_dir = tmp_path / "run"
    proc = _cli("train", "--config", str(config_file), "--output", str(run_dir), "--quiet")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "checkpoint.pkl").is_file() and load_checkpoint(run_dir)[1]["round"] >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its server actor and its local Ray
        proc.wait(timeout=30)
    killed_at = load_checkpoint(run_dir)[1]["round"]
    assert 2 <= killed_at < 6
    resumed = _cli("train", "--resume", str(run_dir), "--quiet")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    _, state = load_checkpoint(run_dir)
    assert [h["round"] for h in state["history"]] == [1, 2, 3, 4, 5, 6]
    run_inprocess(cfg, tmp_path / "ref")
    _, ref = load_checkpoint(tmp_path / "ref")
    np.testing.assert_allclose(state["params"], ref["params"], rtol=1e-6, atol=1e-7)
    assert [h["bytes_up"] for h in state["history"]] == [h["bytes_up"] for h in ref["history"]]


def test_compare_runs_every_variant_on_the_one_cluster(local_ray, tmp_path):
    from apf_ray.cli import main

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(tiny_config(rounds=2).model_dump(mode="json")))
    node = ray.get_runtime_context().get_node_id()
    assert main(["compare", "--quiet", "--config", str(config_file), "--output", str(tmp_path / "cmp"),
                 "--strategies", "fedavg", "apf:threshold=0.95,alpha=0.5"]) == 0
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node  # not restarted
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r["rounds"] for r in rows] == [2, 2] and rows[1]["bytes_up"] < rows[0]["bytes_up"]
