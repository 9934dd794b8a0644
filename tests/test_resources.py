"""A demand for resources that cannot be met: refused up front on a local cluster, said and
bounded on a joined one. The command line runs in real subprocesses; the joined cluster is
real ``ray start`` nodes on this machine (``two_node_cluster``: 1 CPU each)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from actors.backend import local_node_resources, local_trials_note, starved_pools, trials_at_a_time
from apf_ray.config import load_config
from apf_ray.errors import SetupError
from apf_ray.placement import run_bundles, trial_bundles

REPO = Path(__file__).resolve().parent.parent
TOO_MANY = "cluster.pools=[{name: cpu, num_actors: 1000, num_cpus: 1}]"
"""One actor fits any machine; a thousand of them together fit none."""


def apf_ray(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apf_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_train_refuses_pools_that_fit_one_actor_but_not_all_of_them_on_a_local_cluster(tmp_path):
    proc = apf_ray("train", "--quiet", "--set", TOO_MANY, "--output", str(tmp_path / "run"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: the pools ask for {'CPU': 1000.0} in all (cluster.pools[cpu]: 1000 × "
                           "{'CPU': 1.0}); a local cluster on this machine offers {'CPU': "), line
    assert not (tmp_path / "run").exists()


def test_tune_refuses_a_search_whose_one_trial_cannot_fit_the_local_machine(tmp_path):
    proc = apf_ray("tune", "--quiet", "--config", "tune_configs/tiny.yaml", "--set", f"overrides.{TOO_MANY}",
                   "--output", str(tmp_path / "search"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: each trial reserves {'CPU': 1000.0} (cluster.pools[cpu]: 1000 × {'CPU': 1.0}); "
                           "a local cluster on this machine offers"), line
    assert not (tmp_path / "search").exists()


def test_a_search_says_when_the_machine_limits_how_many_trials_run_at_once():
    cpus = local_node_resources(load_config(None))["CPU"]
    whole_machine = load_config(None, [f"cluster.pools=[{{name: cpu, num_actors: 1, num_cpus: {cpus}}}]"])
    # local_trials_note, not trials_at_a_time: the suite's own Ray session may be connected here
    note = local_trials_note(whole_machine, 3, "ray")
    assert note is not None and note.startswith(f"1 trial(s) at a time, not 3: each trial reserves {{'CPU': {cpus}}}")
    assert local_trials_note(whole_machine, 1, "ray") is None
    assert trials_at_a_time(whole_machine, "127.0.0.1:1", 3, "ray") is None  # a joined cluster sizes itself
    # Trained in the trials' own processes, the pools reserve nothing: one CPU (torch_threads) per trial.
    assert local_trials_note(whole_machine, int(cpus), "inprocess") is None
    note = local_trials_note(whole_machine, int(cpus) + 1, "inprocess")
    assert note == (f"{int(cpus)} trial(s) at a time, not {int(cpus) + 1}: each trial reserves {{'CPU': 1.0}} "
                    f"(trial_backend: inprocess, its clients trained in the trial on cluster.torch_threads: 1); "
                    f"this machine has {{'CPU': {cpus}}}")


def test_a_trial_in_its_own_process_reserves_its_torch_threads_and_never_drops_a_configured_gpu():
    two_threads = load_config(None, ["cluster.torch_threads=2"])
    assert trial_bundles(two_threads, "inprocess") == [{"CPU": 2.0}]
    assert trial_bundles(two_threads, "ray") == [{}, *run_bundles(two_threads)]  # the trial's process waits
    gpu = load_config(None, ["cluster.pools=[{name: cpu, num_actors: 2}, {name: gpu, num_actors: 1, num_gpus: 1}]"])
    assert trial_bundles(gpu, "ray")[-1] == {"CPU": 1.0, "GPU": 1.0}
    with pytest.raises(SetupError, match=r"cluster.pools\[gpu\] asks for GPUs: set trial_backend: ray"):
        trial_bundles(gpu, "inprocess")


THREE_ACTORS = "cluster.pools=[{name: cpu, num_actors: 3, num_cpus: 1}]"
"""Two fit the two-node cluster (1 CPU per node), the third never does."""


def _pool(actors: int, ready: int, cpus: float = 1.0) -> dict:
    return {"actors": actors, "ready": ready, "request": {"CPU": cpus}}


def test_actors_that_hold_their_cpus_while_they_start_are_not_said_to_wait_for_resources():
    # A private 2-CPU cluster, both actors placed and importing torch: nothing free, nothing waiting.
    starting = {"cpu": _pool(2, 0)}
    assert starved_pools(starting, starting, {"CPU": 0.0}, {"CPU": 2.0}) == {}
    half = {"cpu": _pool(2, 1)}
    assert starved_pools(half, half, {"CPU": 0.0}, {"CPU": 2.0}) == {}
    # Three actors on two CPUs: one cannot have its CPU, whichever have started.
    for ready in (0, 1, 2):
        three = {"cpu": _pool(3, ready)}
        assert starved_pools(three, three, {"CPU": 0.0}, {"CPU": 2.0}) == three, ready
    # Two pools; the cluster holds less than the run asks: the pool that does not fit what is free waits.
    status = {"cpu": _pool(1, 1), "big": _pool(1, 0, cpus=2.0)}
    missing = {"big": status["big"]}
    assert starved_pools(status, missing, {"CPU": 1.0}, {"CPU": 2.0}) == missing
    assert starved_pools(status, missing, {"CPU": 2.0}, {"CPU": 4.0}) == {}  # fits what is free: no wait


def joined_and_refused(command: str, address: str, *args: str) -> list[str]:
    """The stderr lines of ``apf-ray COMMAND --address ADDRESS ...``, which must end with exit status 2."""
    proc = apf_ray(command, "--address", address, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stderr.splitlines()


@pytest.mark.ray
def test_on_a_joined_cluster_a_wait_for_resources_is_said_then_given_up_with_an_error(two_node_cluster, tmp_path):
    lines = joined_and_refused("train", two_node_cluster.address, "--set", "train.rounds=1", "--set", THREE_ACTORS,
                               "--set", "cluster.startup_timeout_s=15", "--output", str(tmp_path / "run"))
    [waiting] = [line for line in lines if line.startswith("waiting for resources: cluster.pools[cpu] has ")]
    assert "each asks {'CPU': 1.0}; the cluster has {'CPU': 0.0} free; giving up after 15 s" in waiting
    assert lines[-1].startswith("error: gave up after "), lines
    assert re.search(r"\(cluster\.startup_timeout_s\): cluster\.pools\[cpu\] has [0-2] of 3 actor\(s\) started, "
                     r"each asks \{'CPU': 1\.0\}", lines[-1]), lines[-1]  # [0-2]: two fit, if they started in time
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_on_a_joined_cluster_a_pool_no_node_can_host_is_waited_for_then_given_up(two_node_cluster, tmp_path):
    lines = joined_and_refused("train", two_node_cluster.address, "--set", "train.rounds=1",
                               "--set", "cluster.pools=[{name: gpu, resources: {edge_gpu: 1}}]",
                               "--set", "cluster.startup_timeout_s=5", "--output", str(tmp_path / "run"))
    request = "{'CPU': 1.0, 'edge_gpu': 1.0}"
    assert f"cluster.pools[gpu] asks for {request} per actor and no node has that; waiting up to 5 s " \
           "(cluster.startup_timeout_s) for such a node to join" in lines, lines
    assert lines[-1].startswith("error: gave up after "), lines
    assert f"(cluster.startup_timeout_s): cluster.pools[gpu] has 0 of 1 actor(s) started, each asks {request}; " \
           "the cluster has {'CPU': " in lines[-1] and lines[-1].endswith("'edge_gpu': 0.0} free"), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
def test_on_a_joined_cluster_a_search_whose_trial_exceeds_the_cluster_says_so_then_gives_up(two_node_cluster,
                                                                                           tmp_path):
    lines = joined_and_refused("tune", two_node_cluster.address, "--config", "tune_configs/tiny.yaml",
                               "--set", f"overrides.{THREE_ACTORS}", "--set", "overrides.cluster.startup_timeout_s=5",
                               "--output", str(tmp_path / "search"))
    asked = "each trial reserves {'CPU': 3.0} (cluster.pools[cpu]: 3 × {'CPU': 1.0}); the cluster has {'CPU': 2.0}"
    assert any(line.startswith(f"waiting for nodes: {asked} in all; giving up after 5 s") for line in lines), lines
    assert lines[-1] == f"error: gave up after 5 s (cluster.startup_timeout_s): {asked} in all", lines
