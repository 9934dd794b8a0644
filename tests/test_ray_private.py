"""Private Ray APIs live in actors/ray_private.py, checked against the Ray release they were written for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from ray.tune.schedulers import PopulationBasedTraining

from actors import ray_private
from actors.ray_private import RAY_WRITTEN_FOR, RayPrivateAPIError, RayVersionWarning
from apf_ray.errors import SetupError

REPO = Path(__file__).resolve().parent.parent
PRIVATE_NAMES = ("ray._private", "ray._raylet", "ray.autoscaler._private", "._synch", "._trial_state")


def test_no_module_but_ray_private_reaches_into_ray():
    sources = [p for d in ("actors", "apf_ray", "bench", "scripts", "tests") for p in (REPO / d).rglob("*.py")]
    offenders = [f"{p.relative_to(REPO)}: {name}" for p in sources if p.name != "ray_private.py"
                 and p != Path(__file__).resolve() for name in PRIVATE_NAMES if name in p.read_text()]
    assert not offenders


def test_the_installed_ray_is_the_release_written_for_and_importing_warns_nothing():
    assert ray_private.version_mismatch(ray.__version__) is None
    code = ("import warnings\nwith warnings.catch_warnings(record=True) as seen:\n    warnings.simplefilter('always')\n"
            "    import actors.ray_private\nprint([w.category.__name__ for w in seen])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RayVersionWarning" not in proc.stdout


def test_another_ray_release_is_warned_about_naming_both_versions():
    major, minor = RAY_WRITTEN_FOR.split(".")
    assert ray_private.version_mismatch(f"{major}.{minor}.7") is None  # a patch release is the same API
    other = f"{major}.{int(minor) + 1}.0"
    with pytest.warns(RayVersionWarning, match=rf"Ray {other} is installed.*written against Ray {RAY_WRITTEN_FOR}"):
        ray_private.warn_if_other_ray(other)


def test_a_private_name_the_installed_ray_lacks_is_one_clear_error():
    with pytest.raises(RayPrivateAPIError, match=rf"^Ray {ray.__version__} has no ray\._no_such_name, which apf-ray "
                                                 rf"uses \(written against Ray {RAY_WRITTEN_FOR};"):
        ray_private.private_attr(ray, "_no_such_name", "ray")
    with pytest.raises(RayPrivateAPIError, match=r"has no module ray\._private\.no_such_module") as err:
        ray_private.private_module("ray._private.no_such_module")
    assert isinstance(err.value, SetupError)  # the command line prints it as one error line


def test_every_wrapper_works_against_the_installed_ray():
    ray_private.reload_config()
    constants = ray_private.private_module("ray._private.ray_constants")
    before = constants.ENABLE_RAY_CLUSTER
    with ray_private.cluster_mode(not before):
        assert constants.ENABLE_RAY_CLUSTER is (not before)
    assert constants.ENABLE_RAY_CLUSTER is before
    with ray_private.cluster_mode(False):  # loopback only: the address is dialled as written
        assert ray_private.bootstrap_endpoint("127.0.0.1:1") == "127.0.0.1:1"
    cpus, gpus = ray_private.detected_cpus_and_gpus()
    assert cpus >= 1 and gpus >= 0
    pbt = PopulationBasedTraining(time_attr="round", metric="accuracy", mode="max", synch=True,
                                  hyperparam_mutations={"x": [1, 2]})
    assert ray_private.pbt_synchronous(pbt) is True
    state = ray_private.private_attr(pbt, "_trial_state", "PopulationBasedTraining")
    state["trial"] = object()
    ray_private.pbt_forget(pbt, "trial")
    assert "trial" not in state
    cfg = ray_private.checked_cluster_config({"cluster_name": "t", "provider": {"type": "local", "head_ip": "127.0.0.1",
                                                                                 "worker_ips": []},
                                              "auth": {"ssh_user": "root"}})
    assert cfg["cluster_name"] == "t" and "head_node_type" in cfg


LOCAL_NODE_PROBE = """
import json, os, socket, sys, time
from actors.backend import enable_token_auth, local_cluster_env
from apf_ray.config import ExperimentConfig
import ray
verbose = sys.argv[1] == "1"
holder = socket.socket()
try:
    holder.bind(("127.0.0.1", 52365))  # Ray's fixed agent port, taken as another cluster would hold it
    holder.listen()
except OSError:
    pass  # taken already
enable_token_auth()
with local_cluster_env(ExperimentConfig(), verbose=verbose):
    context = ray.init(address="local", include_dashboard=False, num_cpus=1, log_to_driver=verbose)


@ray.remote
def hello():
    print("hello from a worker", flush=True)


ray.get(hello.remote(), timeout=60)
time.sleep(2)  # a log monitor would forward the line within this (it polls the workers' files)
logs = os.path.join(context.address_info["session_dir"], "logs")
port = ray.nodes()[0]["DashboardAgentListenPort"]
agent_log = open(os.path.join(logs, "dashboard_agent.log")).read()
ray.shutdown()
print(json.dumps({"port": port, "bind_failures": agent_log.count("Failed to bind"), "logs": sorted(os.listdir(logs))}))
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_a_local_cluster_starts_only_the_processes_it_uses_and_its_agent_on_a_free_port(verbose):
    # (the fixed port costs ~3.5 s of retries per start whenever another cluster runs on the machine;
    # the monitors ~0.8 s of CPU per start and ~1 s of every stop)
    parameter = ray_private.private_module("ray._private.parameter")
    params = parameter.RayParams
    with ray_private.lean_local_node(forward_worker_output=verbose):
        made = parameter.RayParams()
        assert (made.dashboard_agent_listen_port, made.no_monitor, made.include_log_monitor) == (0, True, verbose)
        assert parameter.RayParams(dashboard_agent_listen_port=7, no_monitor=False).no_monitor is False
    assert parameter.RayParams is params
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    probe = subprocess.run([sys.executable, "-c", LOCAL_NODE_PROBE, str(int(verbose))], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=180)
    assert probe.returncode == 0, probe.stderr[-3000:]
    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["port"] not in (0, 52365) and seen["bind_failures"] == 0, seen
    assert "monitor.log" not in seen["logs"] and "raylet.out" in seen["logs"]  # no autoscaler monitor
    assert ("log_monitor.log" in seen["logs"]) == verbose  # the workers' output is read only to be shown
    assert ("hello from a worker" in probe.stdout) == verbose
