"""Sizing client pools from the nodes' resources (pure logic, no cluster needed)."""

from apf_ray.config import PoolConfig, build_config
from apf_ray.placement import plan_pool_sizes, run_bundles


def _pool(name, **kw):
    return PoolConfig(name=name, **kw)


def test_auto_pools_share_a_node_instead_of_the_first_taking_everything():
    pools = [_pool("edge", num_cpus=1, resources={"edge_cpu": 1}, max_actors=4),
             _pool("gpu", num_cpus=1, resources={"edge_gpu": 1}, max_actors=1)]
    node = {"CPU": 2, "edge_cpu": 4, "edge_gpu": 1}
    assert plan_pool_sizes(pools, [node]) == {"edge": 1, "gpu": 1}


def test_actors_are_packed_per_node_not_against_the_cluster_total():
    pools = [_pool("edge", num_cpus=1, resources={"edge_cpu": 1}, max_actors=8)]
    head = {"CPU": 4, "head_node": 1}
    worker = {"CPU": 1, "edge_cpu": 4}
    assert plan_pool_sizes(pools, [head, worker]) == {"edge": 1}  # the worker has one CPU


def test_auto_pool_without_a_matching_node_targets_zero_and_grows_when_one_joins():
    pools = [_pool("gpu", num_cpus=1, num_gpus=1, max_actors=2)]
    assert plan_pool_sizes(pools, [{"CPU": 8}]) == {"gpu": 0}
    assert plan_pool_sizes(pools, [{"CPU": 8}, {"CPU": 4, "GPU": 2}]) == {"gpu": 2}


def test_fixed_pools_keep_their_size_and_are_placed_first_in_turn():
    pools = [_pool("fixed", num_actors=3, num_cpus=1), _pool("auto", num_cpus=1, max_actors=8)]
    assert plan_pool_sizes(pools, [{"CPU": 4}]) == {"fixed": 3, "auto": 1}
    assert plan_pool_sizes(pools, [{"CPU": 1}]) == {"fixed": 3, "auto": 0}


def test_zero_resource_pool_gets_max_actors():
    assert plan_pool_sizes([_pool("free", num_cpus=0, max_actors=5)], [{"CPU": 1}]) == {"free": 5}


def test_a_runs_bundles_are_one_per_client_actor_and_fill_exactly_its_pools():
    cfg = build_config({"cluster": {"pools": [
        {"name": "edge", "num_actors": 2, "num_cpus": 1, "resources": {"edge_cpu": 1}},
        {"name": "gpu", "max_actors": 1, "num_cpus": 0.5, "num_gpus": 1}]}})
    bundles = run_bundles(cfg)
    assert bundles == [{"CPU": 1, "edge_cpu": 1}, {"CPU": 1, "edge_cpu": 1}, {"CPU": 0.5, "GPU": 1}]
    assert plan_pool_sizes(cfg.cluster.pools, bundles) == {"edge": 2, "gpu": 1}  # a trial's group, sized back
