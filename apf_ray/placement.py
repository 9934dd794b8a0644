"""Resources as data: what one actor of a pool asks for, how many fit, and what a whole run needs.

Pure functions over resource dicts (``{"CPU": 1, "GPU": 0.5, "edge_cpu": 1}``), used by the
Ray layer to size pools from a cluster's nodes or from a Tune trial's placement group, and by
the search driver to declare each trial's bundles.
"""

from __future__ import annotations

from collections.abc import Callable

from apf_ray.config import ExperimentConfig, PoolConfig
from apf_ray.errors import SetupError


def pool_request(pool: PoolConfig) -> dict[str, float]:
    """The Ray resources one actor of ``pool`` asks for."""
    req = {"CPU": pool.num_cpus, "GPU": pool.num_gpus, **pool.resources}
    return {k: v for k, v in req.items() if v > 0}


def fits(node: dict[str, float], request: dict[str, float]) -> bool:
    """Whether one actor asking for ``request`` fits on a node with these resources."""
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in request.items())


def plan_pool_sizes(pools: list[PoolConfig], nodes: list[dict[str, float]]) -> dict[str, int]:
    """Target actor count per pool, packing actors onto the nodes' total resources.

    A pool with a fixed ``num_actors`` always targets that many and is placed first (extra
    ones wait for resources). ``auto`` pools then take turns, one actor each per pass, so
    pools that compete for the same nodes share them instead of the first taking everything;
    each targets what fits, at most ``max_actors`` — zero when no node has its resources.
    """
    free = [dict(n) for n in nodes]

    def place(req: dict[str, float]) -> bool:
        for node in free:
            if fits(node, req):
                for k, v in req.items():
                    node[k] = node.get(k, 0.0) - v
                return True
        return False

    fixed = [p for p in pools if p.num_actors != "auto"]
    auto = [p for p in pools if p.num_actors == "auto"]
    for p in fixed:  # asked for exactly this many: reserve them first
        for _ in range(int(p.num_actors)):
            place(pool_request(p))
    placed = {p.name: 0 for p in auto}
    progress = True
    while progress:
        progress = False
        for p in auto:
            if placed[p.name] < p.max_actors and place(pool_request(p)):
                placed[p.name] += 1
                progress = True
    return {p.name: int(p.num_actors) if p.num_actors != "auto" else placed[p.name] for p in pools}


def most_actors(pool: PoolConfig) -> int:
    """The most actors ``pool`` ever starts: ``num_actors``, or ``max_actors`` for ``auto``."""
    return pool.max_actors if pool.num_actors == "auto" else int(pool.num_actors)


def least_actors(pool: PoolConfig) -> int:
    """The actors ``pool`` needs to start a run: ``num_actors``, or one for ``auto`` (it grows later)."""
    return 1 if pool.num_actors == "auto" else int(pool.num_actors)


def total(requests: list[dict[str, float]]) -> dict[str, float]:
    """The sum of resource requests, per resource."""
    out: dict[str, float] = {}
    for request in requests:
        for key, amount in request.items():
            out[key] = out.get(key, 0.0) + amount
    return out


def pools_demand(pools: list[PoolConfig], count: Callable[[PoolConfig], int]) -> list[dict[str, float]]:
    """One request per actor, ``count(pool)`` actors of each pool (pools that ask for nothing add none)."""
    return [dict(pool_request(p)) for p in pools if pool_request(p) for _ in range(count(p))]


def times_it_fits(node: dict[str, float], demand: dict[str, float]) -> int:
    """How many times ``demand`` (a sum of requests) fits into ``node``'s resources at once."""
    counts = [int(node.get(k, 0.0) / v + 1e-9) for k, v in demand.items() if v > 0]
    return min(counts) if counts else 1_000_000


def demand_text(pools: list[PoolConfig], count: Callable[[PoolConfig], int]) -> str:
    """``cluster.pools[cpu]: 4 × {'CPU': 1.0}`` per pool that asks for resources, for messages."""
    return ", ".join(f"cluster.pools[{p.name}]: {count(p)} × {pool_request(p)}" for p in pools if pool_request(p))


def run_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """One resource bundle per client actor a run of ``cfg`` starts (``auto`` pools: ``max_actors``).

    The server actor asks for nothing (``num_cpus=0``) and the driver only waits, so neither
    needs a bundle of its own; an actor of a pool that asks for nothing needs none either.
    """
    return pools_demand(cfg.cluster.pools, most_actors)


def trial_bundles(cfg: ExperimentConfig, trial_backend: str) -> list[dict[str, float]]:
    """The placement group one Tune trial of ``cfg`` reserves, the trial's own process first.

    ``ray``: the trial's process only drives the run (it asks for nothing); one bundle per client
    actor the run may start (:func:`run_bundles`). ``inprocess``: the trial's process trains every
    client itself on ``cluster.torch_threads`` CPUs and starts no actor. SetupError if that would
    train a pool that asks for GPUs on a CPU: a configured GPU is never silently dropped.
    """
    if trial_backend == "ray":
        return [{}, *run_bundles(cfg)]
    if gpu_pools := [p.name for p in cfg.cluster.pools if p.num_gpus > 0]:
        raise SetupError(f"trial_backend: inprocess trains a trial's clients on its CPUs, but cluster.pools"
                         f"[{gpu_pools[0]}] asks for GPUs: set trial_backend: ray (client actors on GPU nodes)")
    return [{"CPU": float(cfg.cluster.torch_threads)}]


def trial_demand_text(cfg: ExperimentConfig, trial_backend: str) -> str:
    """What one trial's reservation is made of, for messages."""
    if trial_backend == "ray":
        return demand_text(cfg.cluster.pools, most_actors)
    threads = cfg.cluster.torch_threads
    return f"trial_backend: inprocess, its clients trained in the trial on cluster.torch_threads: {threads}"
