"""Heterogeneous pools on a two-node cluster of real ``ray start`` processes on this machine.

Head: ``{"head_node": 1}``, worker: ``{"edge_cpu": 4}``, one CPU each. The tests run in order:
placement first, then the worker node is stopped mid-training and a new one joins.
"""

from __future__ import annotations

import time

import pytest
import ray

from tests.helpers import start_ray_backend, tiny_config
from tests.ray_cluster import EDGE_CPU_RESOURCES

pytestmark = pytest.mark.ray

POOLS = (
    "cluster.pools=[{name: edge, num_actors: auto, max_actors: 1, num_cpus: 0.5, resources: {edge_cpu: 1}},"
    " {name: head, num_actors: auto, max_actors: 1, num_cpus: 0.5, resources: {head_node: 1}}]"
)


def _clients_by_pool(cfg, pool: str) -> set[int]:
    from apf_ray.workload import assign_pools

    return {i for i, p in enumerate(assign_pools(cfg.data.num_clients, cfg.cluster.pools)) if p == pool}


def test_each_pool_is_placed_on_the_nodes_with_its_resources(two_node_cluster, tmp_path):
    cfg = tiny_config(POOLS, rounds=2)
    backend, info = start_ray_backend(cfg, tmp_path)
    try:
        [edge], [head] = info["pools"]["edge"], info["pools"]["head"]
        assert edge["node_id"] == two_node_cluster.workers[0].node_id
        assert head["node_id"] == two_node_cluster.head.node_id
        for _ in range(2):
            assert backend.run_round().record.clients_dropped == 0
    finally:
        backend.close()


def _cross_node_bytes_per_round(cluster, cfg, run_dir, rounds: int = 2) -> tuple[float, list[int]]:
    """Object-store bytes all nodes received from each other per round (after a first round that ships
    the data set), and the clients the edge pool trained in each measured round."""
    backend, _ = start_ray_backend(cfg, run_dir)
    try:
        backend.run_round()
        before = cluster.object_bytes_received()
        trained = [sum(c.pool == "edge" and c.status == "ok" for c in backend.run_round().clients)
                   for _ in range(rounds)]
        return (cluster.object_bytes_received() - before) / rounds, trained
    finally:
        backend.close()


def test_cross_node_traffic_per_round_grows_with_the_actors_not_the_clients(two_node_cluster, tmp_path):
    # one actor per node; 4 then 16 of 32 clients a round. Summed where they train, the edge node's
    # uploads cross as one partial per round (and the broadcast once); a median needs every upload.
    measured = {}
    for aggregation in ("mean", "median"):
        for k in (4, 16):
            cfg = tiny_config(POOLS, "data.num_clients=32", f"train.clients_per_round={k}",
                              f"defence.aggregation={aggregation}", rounds=3)
            measured[aggregation, k] = _cross_node_bytes_per_round(two_node_cluster, cfg,
                                                                   tmp_path / f"{aggregation}-{k}")
    for key, (_, trained) in measured.items():
        assert min(trained) >= 1, f"{key}: the edge node trained no client in a measured round"

    def per_extra_edge_client(aggregation: str) -> float:
        """Bytes a round moved across nodes for each further client the edge node trained."""
        (few, few_trained), (many, many_trained) = measured[aggregation, 4], measured[aggregation, 16]
        return (many - few) / (sum(many_trained) / len(many_trained) - sum(few_trained) / len(few_trained))

    every_upload, summed = per_extra_edge_client("median"), per_extra_edge_client("mean")
    assert every_upload > 100_000, f"a median moves each upload (LeNet-5: ~245 KB), measured {every_upload:.0f} B"
    assert summed < 0.05 * every_upload, (
        f"summed on the edge node, a further client moved {summed:.0f} B across nodes (a median: {every_upload:.0f})")


def test_training_survives_a_stopped_worker_node_and_uses_a_new_one(two_node_cluster, tmp_path):
    # long rounds on purpose (the edge actor still trains when its node stops 1 s in, at ~1 ms a step too);
    # 800 steps with momentum 0.9 move the model by more than the default norm bound
    cfg = tiny_config(POOLS, "train.clients_per_round=6", "train.local_steps=800", "cluster.min_clients=1",
                      "defence.max_update_ratio=null", rounds=6)
    edge_clients = _clients_by_pool(cfg, "edge")
    backend, _ = start_ray_backend(cfg, tmp_path)
    server = backend.server
    try:
        assert backend.run_round().record.clients_reported == 6
        round_ref = server.run_round.remote()
        time.sleep(1.0)
        two_node_cluster.remove_node(two_node_cluster.workers[0])  # mid-round
        rec = ray.get(round_ref, timeout=180).record
        assert rec.clients_reported == 6 - len(edge_clients)  # the head pool's clients still count
        rec = ray.get(server.run_round.remote(), timeout=180).record  # no edge node at all now
        assert rec.clients_reported == 6 - len(edge_clients)
        two_node_cluster.add_node(num_cpus=1, resources=EDGE_CPU_RESOURCES)
        event = ray.get(server.run_round.remote(), timeout=180)
        assert any("pool edge: +1" in e for e in event.pool_events)
        assert event.record.clients_reported == 6  # the new node's actor trains from this round on
        assert ray.get(server.describe.remote(), timeout=30)["edge"][0]["node_id"] == \
            two_node_cluster.workers[0].node_id
    finally:
        backend.close()
