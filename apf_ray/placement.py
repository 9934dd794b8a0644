"""Resources as data: what one actor of a pool asks for, how many fit, and what a whole run needs.

Pure functions over resource dicts (``{"CPU": 1, "GPU": 0.5, "edge_cpu": 1}``), used by the
Ray layer to size pools from a cluster's nodes or from a Tune trial's placement group, and by
the search driver to declare each trial's bundles.
"""

from __future__ import annotations

from apf_ray.config import ExperimentConfig, PoolConfig


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


def run_bundles(cfg: ExperimentConfig) -> list[dict[str, float]]:
    """One resource bundle per client actor a run of ``cfg`` starts (``auto`` pools: ``max_actors``).

    The server actor asks for nothing (``num_cpus=0``) and the driver only waits, so neither
    needs a bundle of its own; an actor of a pool that asks for nothing needs none either.
    """
    bundles = []
    for pool in cfg.cluster.pools:
        count = pool.max_actors if pool.num_actors == "auto" else int(pool.num_actors)
        request = pool_request(pool)
        if request:
            bundles += [dict(request) for _ in range(count)]
    return bundles
