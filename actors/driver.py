"""Driver side of a Ray run: connect to (or start) a cluster, start the server actor, loop rounds."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.pools import alive_node_resources, fits, pool_request
from actors.server import ServerActor
from apf_ray.config import ExperimentConfig
from apf_ray.federation import RoundRecord

log = logging.getLogger("apf_ray.driver")

STARTUP_TIMEOUT_S = 180.0
CONTROL_TIMEOUT_S = 120.0


def enable_token_auth() -> None:
    """Ray 2.60 turns token auth on by default; a driver joining by address must present it.

    Ray reads ``RAY_AUTH_MODE`` when it is imported, so setting it later needs the config
    reload that ``ray.init()`` itself performs when it enables auth.
    """
    if os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        ray._raylet.Config.initialize("")


def local_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Custom resources a local cluster needs so every pool of ``cfg`` can place an actor."""
    out: dict[str, float] = {}
    for pool in cfg.cluster.pools:
        for key, amount in pool.resources.items():
            out[key] = max(out.get(key, 0.0), amount * pool.max_actors)
    return out


@contextmanager
def ray_session(cfg: ExperimentConfig, address: str | None = None) -> Iterator[bool]:
    """Join ``address`` (or the running Ray in this process) or start a local cluster for the block.

    Yields True when this call started Ray (and will shut it down on exit).
    """
    if ray.is_initialized():
        yield False
        return
    address = address or cfg.cluster.address
    if address:
        enable_token_auth()
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        needs_gpu = any(p.num_gpus > 0 for p in cfg.cluster.pools)
        if needs_gpu:
            log.warning("a pool asks for GPUs; a local cluster only has the GPUs Ray detects")
        ray.init(
            address="local",  # a new cluster, never one a `ray start` left registered on this machine
            object_store_memory=cfg.cluster.object_store_mb * 2**20,
            resources=local_resources(cfg) or None,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    try:
        yield True
    finally:
        ray.shutdown()


def check_placeable(cfg: ExperimentConfig) -> None:
    """Warn early, naming the pool, when no node of the cluster can host one of its actors."""
    nodes = alive_node_resources()
    for pool in cfg.cluster.pools:
        request = pool_request(pool)
        if not any(fits(node, request) for node in nodes):
            log.warning(
                "cluster.pools[%s] asks for %s per actor and no node has that; its clients are dropped "
                "until such a node joins", pool.name, request,
            )


def start_server(cfg: ExperimentConfig, run_dir: Path,
                 resume_state: dict[str, Any] | None = None) -> tuple["ray.actor.ActorHandle", dict]:
    """Create the server actor on this (the driver's) node and wait until its pools are ready."""
    here = ray.get_runtime_context().get_node_id()
    server = ServerActor.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    ).remote(cfg.model_dump(mode="json"), str(Path(run_dir).resolve()), resume_state)
    try:
        info = ray.get(server.start.remote(STARTUP_TIMEOUT_S), timeout=STARTUP_TIMEOUT_S + CONTROL_TIMEOUT_S)
    except BaseException:
        ray.kill(server, no_restart=True)
        raise
    return server, info


def train_on_ray(
    cfg: ExperimentConfig,
    run_dir: Path,
    *,
    resume_state: dict[str, Any] | None = None,
    address: str | None = None,
    on_start: Callable[[dict], None] | None = None,
    on_round: Callable[[RoundRecord, list[str]], None] | None = None,
) -> dict[str, Any]:
    """Run one federated training on Ray and return its summary (also written to summary.json)."""
    with ray_session(cfg, address):
        check_placeable(cfg)
        server, info = start_server(cfg, run_dir, resume_state)
        try:
            if on_start:
                on_start(info)
            round_limit = cfg.cluster.round_timeout_s + STARTUP_TIMEOUT_S + CONTROL_TIMEOUT_S
            while not ray.get(server.done.remote(), timeout=CONTROL_TIMEOUT_S):
                rec, events = ray.get(server.run_round.remote(), timeout=round_limit)
                if on_round:
                    on_round(rec, events)
            summary = ray.get(server.finish.remote(), timeout=CONTROL_TIMEOUT_S)
            ray.get(server.shutdown.remote(), timeout=CONTROL_TIMEOUT_S)
            return summary
        finally:
            ray.kill(server, no_restart=True)
