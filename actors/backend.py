"""The Ray backend: join (or start) a cluster, start the server actor, run rounds through it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors import ray_private
from actors.pools import alive_node_resources
from actors.server import ServerActor
from apf_ray.backends import Backend
from apf_ray.config import ExperimentConfig
from apf_ray.errors import SetupError, describe
from apf_ray.placement import (
    demand_text,
    fits,
    least_actors,
    most_actors,
    pool_request,
    pools_demand,
    times_it_fits,
    total,
    trial_bundles,
    trial_demand_text,
)
from apf_ray.plugins import local_modules
from apf_ray.records import RoundEvent
from apf_ray.resume import ResumePoint
from apf_ray.workload import Workload

log = logging.getLogger("apf_ray.ray")
T = TypeVar("T")


def enable_token_auth() -> None:
    """Ray 2.60 turns token auth on by default; a driver joining by address must present it.

    Ray reads ``RAY_AUTH_MODE`` when it is imported, so setting it later needs the config
    reload that ``ray.init()`` itself performs when it enables auth (:func:`ray_private.reload_config`).
    """
    if os.environ.get("RAY_AUTH_MODE") != "token":
        os.environ["RAY_AUTH_MODE"] = "token"
        ray_private.reload_config()


INLINE_RESULT_BYTES = 4 * 2**20
"""Task results up to this many bytes go back inline (Ray's default: 100 KiB), on local clusters.

A LeNet-5 upload is ~178 KB: through the object store each one cost its client actor ~2 ms more
(create, seal, notify, the server's fetch; measured on a loaded 2-core machine) than inline.
4 MiB covers models up to ~1M parameters; larger uploads still go through the object store,
where the server maps them without a copy. A cluster started with ``ray start`` takes the same
variable from the environment of its nodes.
"""


@contextlib.contextmanager
def local_cluster_env(cfg: ExperimentConfig, *, verbose: bool = False) -> Iterator[None]:
    """The environment a local cluster starts in: loopback only, no metrics exporter, unless asked,
    and no process it does not use (:func:`ray_private.lean_local_node`; the workers' output is
    forwarded only when ``verbose``).

    Ray binds every server (GCS, raylets, workers, agents, dashboard) to 127.0.0.1 only in its
    single-machine mode: node IP 127.0.0.1, chosen by ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    (``_node_ip_address="127.0.0.1"`` alone is rewritten to the machine's address). Ray reads
    that variable once, at import, into a private constant, which is set here for the start and
    restored after it, like the variables (:func:`ray_private.cluster_mode`).
    ``RAY_enable_metrics_collection=0`` removes the dashboard agent's unauthenticated Prometheus
    exporter; the fixed metrics port becomes a free one, so several clusters on one machine do not
    collide (so does the dashboard agent's HTTP port). ``RAY_max_direct_call_object_size``
    (:data:`INLINE_RESULT_BYTES`) lets a client's result up to that size travel inside the reply
    to the server instead of through the object store. The cluster's processes inherit this
    environment when they start; later ones are started by them.
    """
    env = {"DASHBOARD_METRIC_PORT": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_max_direct_call_object_size": str(INLINE_RESULT_BYTES)}
    if not cfg.cluster.metrics_export:
        env["RAY_enable_metrics_collection"] = "0"
    if not cfg.cluster.expose:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        with ray_private.cluster_mode(cfg.cluster.expose), ray_private.lean_local_node(forward_worker_output=verbose):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def local_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Custom resources a local cluster needs so every pool of ``cfg`` can place all its actors."""
    out: dict[str, float] = {}
    for pool in cfg.cluster.pools:
        for key, amount in pool.resources.items():
            out[key] = max(out.get(key, 0.0), amount * most_actors(pool))
    return out


def local_node_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What the single node of a local cluster for ``cfg`` will offer (as ``ray.init`` detects it)."""
    cpus, gpus = ray_private.detected_cpus_and_gpus()
    return {"CPU": cpus, "GPU": gpus, **local_resources(cfg)}


def _offered(node: dict[str, float], demand: dict[str, float]) -> dict[str, float]:
    """What ``node`` has of each resource ``demand`` names."""
    return {k: node.get(k, 0.0) for k in demand}


def check_local_fit(cfg: ExperimentConfig) -> None:
    """SetupError naming the pool(s) when a local cluster could never start the run.

    Each pool must fit one actor on the machine, and all of them together the actors a run
    starts with (:func:`~apf_ray.placement.least_actors`: ``num_actors``, one for ``auto``):
    otherwise actors would wait for resources that never free up.
    """
    node = local_node_resources(cfg)
    for pool in cfg.cluster.pools:
        request = pool_request(pool)
        if not fits(node, request):
            short = {k: v for k, v in request.items() if node.get(k, 0.0) + 1e-9 < v}
            raise SetupError(
                f"cluster.pools[{pool.name}] asks for {short} per actor; a local cluster on this machine "
                f"offers {_offered(node, short)} — lower the pool's num_cpus/num_gpus, or join a cluster with --address"
            )
    demand = total(pools_demand(cfg.cluster.pools, least_actors))
    if times_it_fits(node, demand) < 1:
        raise SetupError(
            f"the pools ask for {demand} in all ({demand_text(cfg.cluster.pools, least_actors)}); a local cluster "
            f"on this machine offers {_offered(node, demand)} — lower num_actors (or use num_actors: auto) or "
            "num_cpus/num_gpus, or join a cluster with --address"
        )


def trials_at_a_time(cfg: ExperimentConfig, address: str | None, wanted: int, trial_backend: str) -> str | None:
    """For a search on a local cluster, :func:`local_trials_note`; None on a joined cluster (or a
    process already connected to one), which sizes itself."""
    if ray.is_initialized() or address_to_join(cfg, address)[0]:
        return None
    return local_trials_note(cfg, wanted, trial_backend)


def local_trials_note(cfg: ExperimentConfig, wanted: int, trial_backend: str) -> str | None:
    """SetupError if not even one trial of ``cfg`` fits this machine's local cluster (what a trial
    reserves: :func:`~apf_ray.placement.trial_bundles`); a note if fewer than ``wanted`` trials fit
    at once; None if they do."""
    node = local_node_resources(cfg)
    demand = total(trial_bundles(cfg, trial_backend))
    fit = times_it_fits(node, demand)
    asked = f"each trial reserves {demand} ({trial_demand_text(cfg, trial_backend)})"
    if fit < 1:
        raise SetupError(f"{asked}; a local cluster on this machine offers {_offered(node, demand)} — lower "
                         "max_actors (num_actors: auto) or num_actors, or num_cpus/num_gpus, or join a cluster "
                         "with --address")
    if fit < wanted:
        return f"{fit} trial(s) at a time, not {wanted}: {asked}; this machine has {_offered(node, demand)}"
    return None


PLUGIN_EXCLUDES = ["__pycache__", "*.pyc", ".git"]
"""What of a user's plug-in package never travels to the cluster (Ray also skips what .gitignore lists)."""


def plugin_runtime_env(cfg: ExperimentConfig) -> dict[str, Any] | None:
    """The runtime environment that ships the user's own plug-in modules to every actor, or None.

    A plug-in named by import path (``strategy.name: my_strategies:Median``) whose module lives
    in the working directory, not installed, travels as ``py_modules``: that file or package
    folder only, not the whole directory (Ray refuses packages over its size limit, 512 MiB by
    default, naming it). A driver started by ``ray job submit`` gets its code from the job's own
    runtime environment (``--working-dir``) instead.
    """
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return None
    modules = local_modules(cfg.plugin_names(), Path.cwd())
    if not modules:
        return None
    return {"py_modules": [str(m) for m in modules], "excludes": list(PLUGIN_EXCLUDES)}


def await_trial_capacity(cfg: ExperimentConfig, trial_backend: str) -> None:
    """On a joined cluster, before a search: one trial's reservation must fit the cluster's total.

    If it does not, say so at once and wait for nodes to join (autoscaling, ``ray start``) up
    to ``cluster.startup_timeout_s``, then SetupError: Tune itself would wait for ever.
    """
    demand = total(trial_bundles(cfg, trial_backend))
    asked = f"each trial reserves {demand} ({trial_demand_text(cfg, trial_backend)})"
    deadline = time.monotonic() + cfg.cluster.startup_timeout_s
    warned = False
    while times_it_fits(have := ray.cluster_resources(), demand) < 1:
        if time.monotonic() >= deadline:
            raise SetupError(f"gave up after {cfg.cluster.startup_timeout_s:.0f} s (cluster.startup_timeout_s): "
                             f"{asked}; the cluster has {_offered(have, demand)} in all")
        if not warned:
            log.warning("waiting for nodes: %s; the cluster has %s in all; giving up after %.0f s "
                        "(cluster.startup_timeout_s)", asked, _offered(have, demand), cfg.cluster.startup_timeout_s)
            warned = True
        time.sleep(AWAIT_POLL_S)


def _restore_sigterm(previous: Any) -> None:
    """``ray.init`` installs a SIGTERM handler that calls ``sys.exit``; put the run's clean stop back."""
    if callable(previous) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


ADDRESS_ORIGINS = ("--address", "cluster.address", "RAY_ADDRESS")
"""Where the address of a cluster to join comes from, first found first: the ``address`` argument
(the ``--address`` option), the config, then the environment (``ray job submit`` sets it)."""

_HINTS = {
    "--address": "check the address (HOST:PORT of the head's GCS, as `ray start --head` prints it), or leave "
                 "out --address to start a local cluster",
    "cluster.address": "check cluster.address (HOST:PORT of the head's GCS), or set it to null for a local "
                       "cluster",
    "RAY_ADDRESS": "a stale RAY_ADDRESS in the environment? unset it to start a local cluster",
}

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
"""What a gRPC (HTTP/2) client sends first: the connection preface and an empty SETTINGS frame.
A gRPC server, as a Ray head's GCS is, answers with a SETTINGS frame (type 0x04, in the 4th byte)."""


def address_to_join(cfg: ExperimentConfig, address: str | None) -> tuple[str | None, str]:
    """The cluster address to join and where it came from (:data:`ADDRESS_ORIGINS`); (None, "") for a local one."""
    values = (address, cfg.cluster.address, os.environ.get("RAY_ADDRESS"))
    for value, origin in zip(values, ADDRESS_ORIGINS, strict=True):
        if value:
            return value, origin
    return None, ""


def _dialled_endpoint(address: str) -> str | None:
    """``HOST:PORT`` that ``ray.init(address)`` will connect to, or None if Ray finds none itself.

    Ray replaces a loopback host by this machine's address unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` and looks ``auto`` up in its session files; its own
    function (:func:`ray_private.bootstrap_endpoint`) does both, so the probe dials what Ray will.
    A Ray Client address (``ray://HOST:PORT``) is dialled as written.
    """
    if address.startswith("ray://"):
        return address.removeprefix("ray://").split("/", 1)[0]
    return ray_private.bootstrap_endpoint(address)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT`` or ``[IPv6]:PORT``; ValueError if it is not that."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def gcs_unreachable(host: str, port: int, timeout_s: float) -> str | None:
    """Why no Ray cluster answers at ``host:port`` (one phrase), or None if one (a gRPC server) does.

    A TCP connect, then the HTTP/2 preface (:data:`HTTP2_PREFACE`): seconds at most, where
    ``ray.init`` retries a dead address for minutes. Only a cluster that speaks TLS
    (``RAY_USE_TLS``) skips the second step. A signal (Ctrl-C) interrupts either step at once.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except socket.gaierror as err:
        return f"cannot resolve the host name {host} ({err.strerror})"
    except TimeoutError:
        return f"no answer to a connection within {timeout_s:g} s (cluster.connect_timeout_s)"
    except OSError as err:
        return (err.strerror or str(err)).lower()
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
        sock.close()
        return None
    with sock:
        try:
            sock.sendall(HTTP2_PREFACE)
            head = sock.recv(9)
        except OSError:  # a timeout too: it took the connection and said nothing
            head = b""
    if len(head) >= 4 and head[3] == 0x04:
        return None
    return ("something listens there but it is not a Ray cluster's GCS (the GCS port is the one `ray start "
            "--head` prints, 6379 by default; not the dashboard's 8265)")


def check_reachable(address: str, origin: str, timeout_s: float) -> None:
    """SetupError naming ``address`` and its origin when no Ray cluster answers there (:func:`gcs_unreachable`)."""
    where = f"the Ray cluster at {address} (from {origin})"
    try:
        endpoint = _dialled_endpoint(address)
        if endpoint is None:
            return  # "auto" that Ray cannot resolve: ray.init says so at once
        host, port = _split_endpoint(endpoint)
    except (ValueError, ConnectionError) as err:
        raise SetupError(f"cannot join {where}: {describe(err)} — {_HINTS[origin]}") from None
    why = gcs_unreachable(host, port, timeout_s)
    if why is None:
        return
    dialled = (f"; Ray dials it as {endpoint} (a loopback address becomes this machine's unless "
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)" if endpoint not in address else "")
    raise SetupError(f"cannot reach {where}: {why}{dialled} — {_HINTS[origin]}")


@contextlib.contextmanager
def ray_session(cfg: ExperimentConfig, address: str | None = None, verbose: bool = False) -> Iterator[bool]:
    """Join ``address`` (or the running Ray in this process) or start a local cluster for the block.

    Without an address, ``cluster.address`` and then ``RAY_ADDRESS`` (which ``ray job submit``
    sets for the jobs it runs) name the cluster to join; it is probed first
    (:func:`check_reachable`), so a dead address is a SetupError naming it within seconds.
    Yields True when this call started or
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
    address, origin = address_to_join(cfg, address)
    logs = {"logging_level": logging.INFO if verbose else logging.ERROR, "log_to_driver": verbose}
    previous = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            check_reachable(address, origin, cfg.cluster.connect_timeout_s)
            enable_token_auth()
            ray.init(address=address, runtime_env=plugin_runtime_env(cfg), **logs)
        else:
            check_local_fit(cfg)
            enable_token_auth()  # explicit: auth stays on, and Ray prints no warning about it
            with local_cluster_env(cfg, verbose=verbose):
                ray.init(
                    address="local",  # a new cluster, never one a `ray start` left registered on this machine
                    object_store_memory=cfg.cluster.object_store_mb * 2**20,
                    resources=local_resources(cfg) or None,
                    include_dashboard=False,
                    runtime_env=plugin_runtime_env(cfg),
                    **logs,
                )
    except SetupError:
        raise
    except Exception as err:
        where = f"join the Ray cluster at {address} (from {origin})" if address else "start a local Ray cluster"
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
    warning; the start-up waits for it up to ``cluster.startup_timeout_s``. A local cluster was
    checked before it started (:func:`check_local_fit`).
    """
    nodes = alive_node_resources()
    for pool in cfg.cluster.pools:
        request = pool_request(pool)
        if not any(fits(node, request) for node in nodes):
            log.warning(
                "cluster.pools[%s] asks for %s per actor and no node has that; waiting up to %.0f s "
                "(cluster.startup_timeout_s) for such a node to join", pool.name, request,
                cfg.cluster.startup_timeout_s,
            )


AWAIT_POLL_S = 1.0
"""Seconds the server waits for actors per call while the driver watches the start-up."""
RESOURCE_NOTICE_S = 3.0
"""Seconds of waiting for resources before the driver says what it waits for."""


def _waiting_text(status: dict[str, dict], names: list[str]) -> str:
    """``cluster.pools[cpu] has 2 of 4 actor(s) started, each asks {'CPU': 1.0}`` for the named pools."""
    return "; ".join(f"cluster.pools[{n}] has {status[n]['ready']} of {status[n]['actors']} actor(s) started, "
                     f"each asks {status[n]['request']}" for n in names)


def starved_pools(status: dict[str, dict], missing: dict[str, dict], free: dict[str, float],
                  cluster: dict[str, float]) -> dict[str, dict]:
    """The pools among ``missing`` (not every actor started) that wait for resources, not for start-up.

    ``status``: every pool of the run (``actors``, ``ready``, ``request``); ``free`` and ``cluster``:
    the cluster's free and total resources. An actor that got its resources holds them while its
    process starts (seconds of importing torch on a busy machine), so a cluster with nothing free
    does not by itself mean a wait: while the cluster holds at least what all of this run's actors
    ask, they may all be placed and starting (on a private cluster they are). Only otherwise does a
    pool whose actor does not fit in what is free wait for resources.
    """
    ours = total([s["request"] for s in status.values() for _ in range(s["actors"])])
    held = {key: cluster.get(key, 0.0) - free.get(key, 0.0) for key in ours}
    if fits(held, ours):
        return {}
    return {name: s for name, s in missing.items() if not fits(free, s["request"])}


def _free_text(free: dict[str, float], status: dict[str, dict]) -> str:
    """What the cluster has free of the resources the pools in ``status`` ask for."""
    keys = sorted({k for s in status.values() for k in s["request"]})
    return str({k: round(free.get(k, 0.0), 3) for k in keys})


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

    writes_in_background = True  # on a thread of the server actor

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
        """Before the data loads: a cluster to join must answer at its address; a local cluster
        about to be started must be able to host every pool."""
        if ray.is_initialized():
            return
        address, origin = address_to_join(cfg, self.address)
        if address:
            check_reachable(address, origin, cfg.cluster.connect_timeout_s)
        else:
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
            info = ray.get(self.server.start.remote(), timeout=timeout)
            self._await_actors(cfg)
            info["pools"] = ray.get(self.server.describe.remote(), timeout=cfg.cluster.control_timeout_s)
            return info
        except ray.exceptions.GetTimeoutError:
            raise SetupError(f"the server actor did not start within {timeout:.0f} s "
                             "(cluster.startup_timeout_s + cluster.control_timeout_s)") from None
        except ray.exceptions.RayTaskError as err:
            raise SetupError(f"server set-up failed: {describe(_unwrap(err))}") from None
        except ray.exceptions.RayActorError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SetupError(f"the server actor died during set-up: {first}") from None

    def _await_actors(self, cfg: ExperimentConfig) -> None:
        """Wait for the pools' actors: say within seconds what resources they wait for, and give up
        after ``cluster.startup_timeout_s`` if a pool has fewer than it needs to start
        (``num_actors``; one for ``auto``). A pool that has them starts; the rest join when placed.
        """
        started, warned = time.monotonic(), False
        while True:
            status = ray.get(self.server.await_actors.remote(AWAIT_POLL_S),
                             timeout=AWAIT_POLL_S + cfg.cluster.control_timeout_s)
            least = {p.name: least_actors(p) for p in cfg.cluster.pools}
            for name, s in status.items():  # an auto pool no node can host has no actor yet, and needs one
                s["actors"] = max(s["actors"], least[name])
            missing = {name: s for name, s in status.items() if s["ready"] < s["actors"]}
            if not missing:
                return
            waited = time.monotonic() - started
            free = ray.available_resources()
            starved = starved_pools(status, missing, free, ray.cluster_resources())
            if waited >= cfg.cluster.startup_timeout_s:
                short = [name for name, s in missing.items() if s["ready"] < least[name]]
                if short:
                    raise SetupError(f"gave up after {waited:.0f} s (cluster.startup_timeout_s): "
                                     f"{_waiting_text(missing, short)}; the cluster has "
                                     f"{_free_text(free, missing)} free")
                log.warning("starting without the actors still missing (they join once placed): %s",
                            _waiting_text(missing, list(missing)))
                return
            if starved and not warned and waited >= RESOURCE_NOTICE_S:
                log.warning("waiting for resources: %s; the cluster has %s free; giving up after %.0f s "
                            "(cluster.startup_timeout_s)", _waiting_text(starved, list(starved)),
                            _free_text(free, starved), cfg.cluster.startup_timeout_s)
                warned = True

    def run_round(self) -> RoundEvent:
        c = self.cfg.cluster
        return ray.get(self.server.run_round.remote(),
                       timeout=c.round_timeout_s + c.startup_timeout_s + c.control_timeout_s)

    def save_checkpoint(self, callbacks: dict[str, Any], background: bool = False) -> Path:
        return Path(ray.get(self.server.save_checkpoint.remote(callbacks, background),
                            timeout=self.cfg.cluster.control_timeout_s))

    def finish_checkpoint(self) -> None:
        ray.get(self.server.finish_checkpoint.remote(), timeout=self.cfg.cluster.control_timeout_s)

    def query(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(server, *args)`` inside the server actor (``fn`` and ``args`` travel pickled)."""
        return ray.get(self.server.query.remote(fn, *args), timeout=self.cfg.cluster.control_timeout_s)

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
