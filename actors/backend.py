"""The Ray backend: join (or start) a cluster, start the server actor, run rounds through it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.pools import alive_node_resources
from actors.server import ServerActor
from apf_ray.backends import Backend
from apf_ray.config import ExperimentConfig
from apf_ray.placement import fits, pool_request
from apf_ray.records import RoundEvent
from apf_ray.resume import ResumePoint
from apf_ray.workload import Workload

log = logging.getLogger("apf_ray.ray")


def enable_token_auth() -> None:
    """Ray 2.60 turns token auth on by default; a driver joining by address must present it.

    Ray reads ``RAY_AUTH_MODE`` when it is imported, so setting it later needs the config
    reload that ``ray.init()`` itself performs when it enables auth (a private API, used
    only here).
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


@contextlib.contextmanager
def ray_session(cfg: ExperimentConfig, address: str | None = None, verbose: bool = False) -> Iterator[bool]:
    """Join ``address`` (or the running Ray in this process) or start a local cluster for the block.

    Without an address, ``cluster.address`` and then ``RAY_ADDRESS`` (which ``ray job submit``
    sets for the jobs it runs) name the cluster to join. Yields True when this call started or
    joined Ray (and will disconnect on exit). Ray's own output (its start-up warnings, such as
    the token-authentication notice every new local cluster logs, and the workers'
    stdout/stderr) stays out of the terminal unless ``verbose``: the run's records already
    carry every client error, and Ray's logs stay in its session folder.
    """
    if ray.is_initialized():
        yield False
        return
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    logs = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    if address:
        enable_token_auth()
        ray.init(address=address, **logs)
    else:
        if any(p.num_gpus > 0 for p in cfg.cluster.pools):
            log.warning("a pool asks for GPUs; a local cluster only has the GPUs Ray detects")
        ray.init(
            address="local",  # a new cluster, never one a `ray start` left registered on this machine
            object_store_memory=cfg.cluster.object_store_mb * 2**20,
            resources=local_resources(cfg) or None,
            include_dashboard=False,
            **logs,
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


class RayBackend(Backend):
    """A server actor (on the driver's node, ``num_cpus=0``) and client-pool actors.

    ``address`` joins an existing cluster (default: ``cluster.address``, else a local one;
    a Ray session already open in this process is reused); ``verbose`` shows Ray's own logs.
    ``dataset_ref`` is the dataset already in the object store (Tune shares one among trials);
    by default it is put once.
    """

    @classmethod
    def session(cls, cfg: ExperimentConfig, address: str | None = None, verbose: bool = False,
                **options: Any) -> contextlib.AbstractContextManager:
        """One Ray session for several runs (``apf-ray compare``, Tune's driver)."""
        return ray_session(cfg, address, verbose)

    def __init__(self, address: str | None = None, dataset_ref: ray.ObjectRef | None = None,
                 verbose: bool = False) -> None:
        self.address = address
        self.verbose = verbose
        self.dataset_ref = dataset_ref
        self.server = None
        self._session = contextlib.ExitStack()

    def start(self, cfg: ExperimentConfig, run_dir: Path, workload: Workload,
              resume: ResumePoint | None) -> dict[str, Any]:
        self.cfg = cfg
        self._session.enter_context(ray_session(cfg, self.address, self.verbose))
        check_placeable(cfg)
        dataset_ref = self.dataset_ref if self.dataset_ref is not None else ray.put(workload.dataset)
        options = {}
        if ray.util.get_current_placement_group() is None:
            # Pinned to this node so the run directory is local. Inside a placement group (a Tune
            # trial) the server must stay in the group instead, or its client actors — which the
            # group captures through it — would be placed outside the trial's reserved bundles.
            here = ray.get_runtime_context().get_node_id()
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        self.server = ServerActor.options(**options).remote(
            cfg.to_dict(), str(Path(run_dir).resolve()), dataset_ref, [dataset_ref],
            replace(workload, dataset=None), resume)
        timeout = cfg.cluster.startup_timeout_s + cfg.cluster.control_timeout_s
        return ray.get(self.server.start.remote(), timeout=timeout)

    def run_round(self) -> RoundEvent:
        c = self.cfg.cluster
        return ray.get(self.server.run_round.remote(),
                       timeout=c.round_timeout_s + c.startup_timeout_s + c.control_timeout_s)

    def save_checkpoint(self) -> Path:
        return Path(ray.get(self.server.save_checkpoint.remote(), timeout=self.cfg.cluster.control_timeout_s))

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(self.server.shutdown.remote(), timeout=self.cfg.cluster.control_timeout_s)
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self.server, no_restart=True)
            self.server = None
        self._session.close()
