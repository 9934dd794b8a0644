"""The Ray backend: join (or start) a cluster, start the server actor, run rounds through it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
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
from apf_ray.errors import SetupError, describe
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


INLINE_RESULT_BYTES = 4 * 2**20
"""Task results up to this many bytes go back inline (Ray's default: 100 KiB), on local clusters.

A LeNet-5 upload is ~178 KB: through the object store each one cost its client actor ~2 ms more
(create, seal, notify, the server's fetch; measured on a loaded 2-core machine) than inline.
4 MiB covers models up to ~1M parameters; larger uploads still go through the object store,
where the server maps them without a copy. A cluster started with ``ray start`` takes the same
variable from the environment of its nodes.
"""


@contextlib.contextmanager
def local_cluster_env(cfg: ExperimentConfig) -> Iterator[None]:
    """The environment a local cluster starts in: loopback only, no metrics exporter, unless asked.

    Ray binds every server (GCS, raylets, workers, agents, dashboard) to 127.0.0.1 only in its
    single-machine mode: node IP 127.0.0.1, chosen by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    (``_node_ip_address="127.0.0.1"`` alone is rewritten to the machine's address). Ray reads
    that variable once, at import, into a private constant, which is set here for the start and
    restored after it, like the variables. ``RAY_enable_metrics_collection=0`` removes the
    dashboard agent's unauthenticated Prometheus exporter; the fixed metrics ports become free
    ones, so several clusters on one machine do not collide. ``RAY_max_direct_call_object_size``
    (:data:`INLINE_RESULT_BYTES`) lets a client's result up to that size travel inside the reply
    to the server instead of through the object store. The cluster's processes inherit this
    environment when they start; later ones are started by them.
    """
    import ray._private.ray_constants as ray_constants  # private: the only switch for the node IP

    env = {"AUTOSCALER_METRIC_PORT": "0", "DASHBOARD_METRIC_PORT": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_max_direct_call_object_size": str(INLINE_RESULT_BYTES)}
    if not cfg.cluster.metrics_export:
        env["RAY_enable_metrics_collection"] = "0"
    if not cfg.cluster.expose:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    saved = {key: os.environ.get(key) for key in env}
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = cfg.cluster.expose
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def local_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Custom resources a local cluster needs so every pool of ``cfg`` can place an actor."""
    out: dict[str, float] = {}
    for pool in cfg.cluster.pools:
        for key, amount in pool.resources.items():
            out[key] = max(out.get(key, 0.0), amount * pool.max_actors)
    return out


def local_node_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What the single node of a local cluster for ``cfg`` will offer (as ``ray.init`` detects it)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource  # private: Ray's own detection
    from ray._private.utils import get_num_cpus

    try:
        gpus = float(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())
    except Exception:  # detection failing means Ray will not see a GPU either
        gpus = 0.0
    return {"CPU": float(get_num_cpus()), "GPU": gpus, **local_resources(cfg)}


def check_local_fit(cfg: ExperimentConfig) -> None:
    """SetupError naming the pool when no actor of it fits the local node: it could never run."""
    node = local_node_resources(cfg)
    for pool in cfg.cluster.pools:
        request = pool_request(pool)
        if not fits(node, request):
            short = {k: v for k, v in request.items() if node.get(k, 0.0) + 1e-9 < v}
            offered = {k: node.get(k, 0.0) for k in short}
            raise SetupError(
                f"cluster.pools[{pool.name}] asks for {short} per actor; a local cluster on this machine "
                f"offers {offered} — lower the pool's num_cpus/num_gpus, or join a cluster with --address"
            )


def _restore_sigterm(previous: Any) -> None:
    """``ray.init`` installs a SIGTERM handler that calls ``sys.exit``; put the run's clean stop back."""
    if callable(previous) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_session(cfg: ExperimentConfig, address: str | None = None, verbose: bool = False) -> Iterator[bool]:
    """Join ``address`` (or the running Ray in this process) or start a local cluster for the block.

    Without an address, ``cluster.address`` and then ``RAY_ADDRESS`` (which ``ray job submit``
    sets for the jobs it runs) name the cluster to join. Yields True when this call started or
    joined Ray (and will disconnect on exit). A local cluster is checked first (a pool that no
    actor of could fit is a SetupError before anything starts) and listens on 127.0.0.1 only,
    with token auth and no metrics exporter, unless ``cluster.expose`` /
    ``cluster.metrics_export`` ask otherwise (:func:`local_cluster_env`). Ray's own output (its
    start-up warnings and the workers' stdout/stderr) stays out of the terminal unless
    ``verbose``: the run's records already carry every client error, and Ray's logs stay in
    its session folder.
    """
    if ray.is_initialized():
        yield False
        return
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    logs = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            enable_token_auth()
            ray.init(address=address, **logs)
        else:
            check_local_fit(cfg)
            enable_token_auth()  # explicit: auth stays on, and Ray prints no warning about it
            with local_cluster_env(cfg):
                ray.init(
                    address="local",  # a new cluster, never one a `ray start` left registered on this machine
                    object_store_memory=cfg.cluster.object_store_mb * 2**20,
                    resources=local_resources(cfg) or None,
                    include_dashboard=False,
                    **logs,
                )
    except SetupError:
        raise
    except Exception as err:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        if ray.is_initialized():
            ray.shutdown()
        raise SetupError(f"could not {where}: {describe(err)}") from None
    finally:
        _restore_sigterm(previous)
    try:
        yield True
    finally:
        ray.shutdown()


def check_placeable(cfg: ExperimentConfig) -> None:
    """Warn early, naming the pool, when no node of the cluster can host one of its actors.

    A joined cluster may still gain such a node (autoscaling, ``ray start``), so this is a
    warning; a local cluster was checked before it started (:func:`check_local_fit`).
    """
    nodes = alive_node_resources()
    for pool in cfg.cluster.pools:
        request = pool_request(pool)
        if not any(fits(node, request) for node in nodes):
            log.warning(
                "cluster.pools[%s] asks for %s per actor and no node has that; its clients are dropped "
                "until such a node joins", pool.name, request,
            )


def _unwrap(err: BaseException) -> BaseException:
    """The user's exception inside a Ray error (a task's cause), else the error itself."""
    while isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None and err.cause is not err:
        err = err.cause
    return err


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

    def check(self, cfg: ExperimentConfig) -> None:
        """A local cluster about to be started must be able to host one actor of every pool."""
        if not ray.is_initialized() and not (self.address or cfg.cluster.address):
            check_local_fit(cfg)

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
        try:
            return ray.get(self.server.start.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise SetupError(f"the server actor did not start within {timeout:.0f} s "
                             "(cluster.startup_timeout_s + cluster.control_timeout_s)") from None
        except ray.exceptions.RayTaskError as err:
            raise SetupError(f"server set-up failed: {describe(_unwrap(err))}") from None
        except ray.exceptions.RayActorError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SetupError(f"the server actor died during set-up: {first}") from None

    def run_round(self) -> RoundEvent:
        c = self.cfg.cluster
        return ray.get(self.server.run_round.remote(),
                       timeout=c.round_timeout_s + c.startup_timeout_s + c.control_timeout_s)

    def save_checkpoint(self) -> Path:
        return Path(ray.get(self.server.save_checkpoint.remote(), timeout=self.cfg.cluster.control_timeout_s))

    def abort(self) -> None:
        """Kill the server actor (its client actors die with it) and leave the session at once."""
        if self.server is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self.server, no_restart=True)
            self.server = None
        self._session.close()

    def close(self) -> None:
        if self.server is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(self.server.shutdown.remote(), timeout=self.cfg.cluster.control_timeout_s)
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self.server, no_restart=True)
            self.server = None
        self._session.close()
