"""The Ray plumbing: a local node, a two-node `ray start` cluster that loses and gains nodes,
and the `ray up` cluster.yaml.

The ``local_ray`` test comes first: ``two_node_cluster`` stops the local cluster for the rest
of this module, so no ``local_ray`` test may follow a two-node one here.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import apf_ray
from actors.ray_private import checked_cluster_config
from apf_ray.config import load_config
from tests.ray_cluster import (
    EDGE_CPU_RESOURCES,
    LOCAL_OBJECT_STORE_BYTES,
    ClusterNode,
    LocalCluster,
)

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
CONFIGS = ROOT / "configs"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
GET_TIMEOUT_S = 30.0  # a ray.get that hangs is a failure, never a stuck run


@ray.remote(num_cpus=0)
def node_id_of_task() -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
def apf_ray_location() -> str:
    return apf_ray.__file__


@ray.remote(num_cpus=0)
class Probe:
    """An actor that reports where it lives and can be kept busy like a training client."""

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def busy(self, seconds: float) -> None:
        time.sleep(seconds)


@pytest.fixture
def join_node(two_node_cluster: LocalCluster) -> Iterator[Callable[..., ClusterNode]]:
    """``join_node(num_cpus=..., resources=...)``; joined nodes still up are removed after."""
    joined: list[ClusterNode] = []

    def join(**node_args: object) -> ClusterNode:
        joined.append(two_node_cluster.add_node(**node_args))
        return joined[-1]

    yield join
    for node in joined:
        if node in two_node_cluster.workers:
            two_node_cluster.remove_node(node)


def test_local_ray_is_one_node_with_two_cpus_and_a_300_mib_object_store(local_ray) -> None:
    resources = ray.cluster_resources()
    assert len(ray.nodes()) == 1
    assert resources["CPU"] == 2
    assert resources["object_store_memory"] == LOCAL_OBJECT_STORE_BYTES == 300 * 1024**2


def test_two_node_cluster_sums_head_and_edge_resources(two_node_cluster: LocalCluster) -> None:
    resources = ray.cluster_resources()
    assert [resources["CPU"], resources["head_node"], resources["edge_cpu"]] == [2, 1, 4]
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert alive == {two_node_cluster.head.node_id, two_node_cluster.workers[0].node_id}


def test_edge_cpu_actor_runs_on_the_worker_node(two_node_cluster: LocalCluster) -> None:
    probe = Probe.options(resources={"edge_cpu": 1}).remote()
    node_id = ray.get(probe.node_id.remote(), timeout=GET_TIMEOUT_S)
    assert node_id == two_node_cluster.workers[0].node_id


def test_head_node_task_runs_on_the_head_node(two_node_cluster: LocalCluster) -> None:
    node_id = ray.get(
        node_id_of_task.options(resources={"head_node": 1}).remote(), timeout=GET_TIMEOUT_S
    )
    assert node_id == two_node_cluster.head.node_id


def test_worker_node_imports_the_project_from_the_driver_path(
    two_node_cluster: LocalCluster,
) -> None:
    location = apf_ray_location.options(resources={"edge_cpu": 1}).remote()
    assert ray.get(location, timeout=GET_TIMEOUT_S) == apf_ray.__file__


def _busy_actor_on_new_node(join_node: Callable[..., ClusterNode]) -> tuple[ClusterNode, object, ray.ObjectRef]:
    """A fresh edge node running an actor that is busy for 10 minutes."""
    node = join_node(num_cpus=1, resources=EDGE_CPU_RESOURCES)
    probe = Probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    ).remote()
    assert ray.get(probe.node_id.remote(), timeout=GET_TIMEOUT_S) == node.node_id
    return node, probe, probe.busy.remote(600)


def test_stopping_a_worker_node_kills_its_busy_actor_and_the_cluster_keeps_working(
    two_node_cluster: LocalCluster, join_node: Callable[..., ClusterNode]
) -> None:
    doomed, _, training = _busy_actor_on_new_node(join_node)

    two_node_cluster.remove_node(doomed)

    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(training, timeout=GET_TIMEOUT_S)
    survivor = node_id_of_task.options(resources={"edge_cpu": 1}).remote()
    assert ray.get(survivor, timeout=GET_TIMEOUT_S) == two_node_cluster.workers[0].node_id


def test_a_crashed_worker_node_is_marked_dead_and_its_actor_dies(
    two_node_cluster: LocalCluster, join_node: Callable[..., ClusterNode]
) -> None:
    doomed, probe, training = _busy_actor_on_new_node(join_node)

    two_node_cluster.remove_node(doomed, graceful=False)

    assert doomed.node_id not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    # The call in flight may fail as ActorUnavailableError (the RPC broke before the head knew
    # the node was dead); both are RayActorError. Calls made after that are ActorDiedError.
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(training, timeout=GET_TIMEOUT_S)
    with pytest.raises(ray.exceptions.ActorDiedError):
        ray.get(probe.node_id.remote(), timeout=GET_TIMEOUT_S)


def test_a_node_joining_later_hosts_the_actor_that_waited_for_its_resource(
    join_node: Callable[..., ClusterNode],
) -> None:
    probe = Probe.options(resources={"edge_gpu": 1}).remote()
    where = probe.node_id.remote()
    ready, _ = ray.wait([where], timeout=1.0)
    assert ready == []  # no node offers edge_gpu yet

    gpu_node = join_node(num_cpus=1, resources={"edge_gpu": 1})

    assert ray.get(where, timeout=GET_TIMEOUT_S) == gpu_node.node_id
    assert ray.cluster_resources()["edge_gpu"] == 1


def _cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _node_kinds() -> list[dict[str, float]]:
    """The custom resources of each node kind, from the `--resources` of the start commands."""
    config = _cluster_config()
    commands = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    return [json.loads(spec) for spec in re.findall(r"--resources='([^']*)'", commands)]


def test_cluster_yaml_validates_against_rays_schema() -> None:
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(_cluster_config(), schema)


def test_cluster_yaml_passes_ray_ups_local_provider_preparation() -> None:
    """`ray up` runs exactly this before it connects to any node; it rejects node types
    the local provider cannot launch."""
    checked_cluster_config(_cluster_config())


def test_cluster_yaml_node_kinds_are_head_gpu_and_cpu_edge() -> None:
    kinds = _node_kinds()
    assert [sorted(resources) for resources in kinds] == [["head_node"], ["edge_gpu"], ["edge_cpu"]]
    assert all(amount >= 1 for resources in kinds for amount in resources.values())


@pytest.mark.parametrize("config_path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_client_pool_fits_one_cluster_yaml_node_kind(config_path: Path) -> None:
    kinds = _node_kinds()
    for pool in load_config(config_path).cluster.pools:
        assert any(
            all(kind.get(name, 0) >= amount for name, amount in pool.resources.items())
            for kind in kinds
        ), f"{config_path.name}: pool {pool.name!r} needs {pool.resources}; nodes offer {kinds}"
