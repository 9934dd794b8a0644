"""Real Ray clusters for tests: one in-process local node, or `ray start` nodes on this machine.

The test root's conftest loads the fixtures with ``pytest_plugins = ["tests.ray_cluster"]``.
A process holds one Ray driver at a time, so ``two_node_cluster`` stops the ``local_ray``
cluster for its module and the next test that asks for ``local_ray`` starts a fresh one; a
module must not request ``local_ray`` after a ``two_node_cluster`` test.

Ray 2.60 facts this module is built on:
- Token auth is on by default. ``ray.init()`` without an address creates ``~/.ray/auth_token``
  and sets ``RAY_AUTH_MODE=token`` in its own process, but a process that joins a cluster at an
  explicit address (``ray start --address``, ``ray.init(address=...)``) must have
  ``RAY_AUTH_MODE=token`` itself, or it fails after ~20 s with ``ConnectionError``. Ray reads the
  variable when ``ray`` is imported, so setting it later needs a config reload.
- ``ray stop`` stops every Ray process on the machine, other people's clusters included, so each
  node here is a ``ray start --block`` child in its own process group, stopped by signal.
- SIGTERM to ``ray start --block`` drains the node for up to
  ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` (30 s by default) while actors live on it, so the
  nodes here run with 0 and stop at once.
- Every node's dashboard agent listens on port 52365 unless told otherwise; a node that finds it
  taken spends ~3.5 s retrying, so the nodes here get free ports (``ray.init`` has no option).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import ray

from actors.backend import enable_token_auth, local_cluster_env
from apf_ray.config import ExperimentConfig

if TYPE_CHECKING:
    from actors.ray_private import RayContext

# Small object stores: the machine's RAM is shared with other test runs.
LOCAL_OBJECT_STORE_BYTES = 300 * 1024**2
NODE_OBJECT_STORE_BYTES = 256 * 1024**2
HEAD_RESOURCES: dict[str, float] = {"head_node": 1}
EDGE_CPU_RESOURCES: dict[str, float] = {"edge_cpu": 4}

_STARTED_MARKER = "Ray runtime started."  # printed by `ray start` once the node is up
_NODE_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # The head declares a killed node dead after 5 missed 1 s health checks (~6 s) instead
    # of Ray's default ~15 s, so crash tests stay short.
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
    # Each raylet reports its metrics (object_bytes_received) every 0.5 s instead of every 10 s.
    "RAY_metrics_report_interval_ms": "500",
}
_METRICS_SETTLE_S = 1.5  # three report intervals: a counter read after this includes what came before
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, eq=False)
class ClusterNode:
    """One `ray start --block` process group; ``node_id`` is Ray's hex node id."""

    node_id: str
    num_cpus: int
    resources: dict[str, float]
    temp_dir: Path
    process: subprocess.Popen = field(repr=False)


class LocalCluster:
    """A multi-node Ray cluster of real `ray start` processes on this machine.

    ``start_head`` also connects the calling process as the driver: node ids are read from the
    driver's view of the cluster. Use it as a context manager, or call ``shutdown``. Stopping
    signals only the processes this object started, never other Ray clusters on the machine.
    """

    def __init__(
        self,
        *,
        object_store_bytes: int = NODE_OBJECT_STORE_BYTES,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 30.0,
    ) -> None:
        self.object_store_bytes = object_store_bytes
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.head: ClusterNode | None = None
        self.workers: list[ClusterNode] = []
        self._address: str | None = None
        self._root = Path(tempfile.mkdtemp(prefix="apf-ray-cluster-"))
        self._processes: list[subprocess.Popen] = []  # launch order, head first

    @property
    def address(self) -> str:
        """``host:port`` of the head's GCS: the value for ``--address`` and ``ray.init``."""
        if self._address is None:
            raise RuntimeError("LocalCluster.address: the head node is not started")
        return self._address

    def start_head(
        self, *, num_cpus: int = 1, resources: dict[str, float] | None = None
    ) -> ClusterNode:
        """Start the head node and connect this process to it as the driver."""
        if self.head is not None:
            raise RuntimeError(f"LocalCluster.start_head: head already runs at {self._address}")
        if ray.is_initialized():
            raise RuntimeError(
                "LocalCluster.start_head: this process is already a Ray driver; call "
                "ray.shutdown() first (the two_node_cluster fixture stops local_ray)"
            )
        ensure_auth_token()
        port = _free_port()
        address = f"127.0.0.1:{port}"
        process, temp_dir = self._launch(
            ["--head", f"--port={port}", f"--ray-client-server-port={_free_port()}",
             "--include-dashboard=false"],
            num_cpus,
            resources or {},
        )
        enable_token_auth()
        ray.init(address=address, log_to_driver=False)
        self._address = address
        self.head = self._register(process, temp_dir, num_cpus, resources or {})
        return self.head

    def add_node(
        self, *, num_cpus: int = 1, resources: dict[str, float] | None = None
    ) -> ClusterNode:
        """Join one worker node; returns once the driver sees it alive."""
        process, temp_dir = self._launch([f"--address={self.address}"], num_cpus, resources or {})
        node = self._register(process, temp_dir, num_cpus, resources or {})
        self.workers.append(node)
        return node

    def remove_node(self, node: ClusterNode, *, graceful: bool = True) -> None:
        """Stop one worker node and wait until the head marks it dead.

        ``graceful=True`` sends SIGTERM: the raylet unregisters and its actors die at once.
        ``graceful=False`` SIGKILLs the node like a crashed machine; the head notices through
        missed health checks (~6 s here).
        """
        if node not in self.workers:
            raise ValueError(
                f"LocalCluster.remove_node: node {node.node_id} is not a running worker"
            )
        self._stop(node.process, signal.SIGTERM if graceful else signal.SIGKILL)
        self.workers.remove(node)
        self._wait_for(
            lambda: not _is_alive(node.node_id),
            lambda: f"node {node.node_id} still alive {self.stop_timeout_s} s after its stop",
            self.stop_timeout_s,
        )

    def shutdown(self) -> None:
        """Disconnect the driver, stop every node this cluster started and delete its files."""
        if ray.is_initialized():
            ray.shutdown()
        for process in reversed(self._processes):
            self._stop(process, signal.SIGTERM)
        self._processes.clear()
        self.workers.clear()
        self.head = None
        self._address = None
        shutil.rmtree(self._root, ignore_errors=True)

    def object_bytes_received(self) -> float:
        """Bytes the alive nodes' object managers have received from other nodes so far, together.

        Read from Ray's own counter (``ray_object_manager_bytes{Type="Received"}``) on each node's
        metrics endpoint (127.0.0.1), after the raylets' next reports: what one node pulled from
        another's object store -- arguments, results and ``ray.put`` objects that crossed nodes.
        Small results travel inline with the call's reply and are not counted here.
        """
        time.sleep(_METRICS_SETTLE_S)
        received = 0.0
        for node in ray.nodes():
            if not node["Alive"]:
                continue
            url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
            received += sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith("ray_object_manager_bytes{") and 'Type="Received"' in line)
        return received

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def _launch(
        self, role_args: list[str], num_cpus: int, resources: dict[str, float]
    ) -> tuple[subprocess.Popen, Path]:
        """Start `ray start --block` in its own process group and wait for its start marker."""
        temp_dir = Path(tempfile.mkdtemp(prefix="n", dir=self._root))
        log_path = temp_dir / "ray_start.log"
        command = [
            "ray", "start", *role_args,
            f"--temp-dir={temp_dir}",
            f"--num-cpus={num_cpus}",
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={self.object_store_bytes}",
            f"--dashboard-agent-listen-port={_free_port()}",
            "--disable-usage-stats",
            "--log-style=record",
            "--block",
        ]
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **_NODE_ENV},
                start_new_session=True,  # a process group of its own, signalled as a whole
                preexec_fn=_die_with_parent,
            )
        self._processes.append(process)

        def started() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"LocalCluster: `{' '.join(command)}` exited with {process.returncode}:\n"
                    f"{log_path.read_text()}"
                )
            return _STARTED_MARKER in log_path.read_text()

        self._wait_for(
            started,
            lambda: f"`ray start` not up after {self.start_timeout_s} s:\n{log_path.read_text()}",
            self.start_timeout_s,
        )
        return process, temp_dir

    def _register(
        self, process: subprocess.Popen, temp_dir: Path, num_cpus: int, resources: dict[str, float]
    ) -> ClusterNode:
        """Find the node's id: the alive node whose raylet socket lives under its temp dir."""
        found: list[str] = []

        def visible() -> bool:
            found[:] = [
                node["NodeID"] for node in ray.nodes()
                if node["Alive"] and node["RayletSocketName"].startswith(f"{temp_dir}/")
            ]
            return bool(found)

        self._wait_for(
            visible,
            lambda: f"node started under {temp_dir} never appeared in ray.nodes()",
            self.start_timeout_s,
        )
        return ClusterNode(found[0], num_cpus, dict(resources), temp_dir, process)

    def _stop(self, process: subprocess.Popen, sig: signal.Signals) -> None:
        """Signal the node's process group; SIGKILL it if it outlives ``stop_timeout_s``."""
        if process.poll() is not None:
            return
        os.killpg(process.pid, sig)
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=self.stop_timeout_s)

    @staticmethod
    def _wait_for(
        condition: Callable[[], bool], describe_failure: Callable[[], str], timeout_s: float
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"LocalCluster: {describe_failure()}")
            time.sleep(0.1)


@contextlib.contextmanager
def job_head(num_cpus: int = 2, start_timeout_s: float = 120.0) -> Iterator[str]:
    """A `ray start --head` node whose dashboard (Ray's job server) listens on 127.0.0.1.

    Yields the job server's URL for ``ray job submit --address``. This process does not
    connect to it as a driver, so it can run beside ``local_ray``.
    """
    ensure_auth_token()
    nodes = LocalCluster()
    dashboard = _free_port()
    process, _ = nodes._launch(
        ["--head", f"--port={_free_port()}", f"--ray-client-server-port={_free_port()}",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}"],
        num_cpus, {})
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:  # the dashboard comes up after the node reported itself started
            try:
                socket.create_connection(("127.0.0.1", dashboard), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job server not listening on 127.0.0.1:{dashboard}") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        nodes._stop(process, signal.SIGTERM)
        shutil.rmtree(nodes._root, ignore_errors=True)


def _free_port() -> int:
    """A TCP port that is free now (another process could still take it before Ray does)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_auth_token() -> None:
    """Create ``~/.ray/auth_token`` unless a token exists; `ray start --head` never creates one."""
    if (Path.home() / ".ray" / "auth_token").exists() or any(
        os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    ):
        return  # skips ~1.7 s of CLI start-up
    subprocess.run(
        ["ray", "get-auth-token", "--generate"],
        check=True,
        stdout=subprocess.DEVNULL,  # the command prints the token itself
        stderr=subprocess.PIPE,
        timeout=60,
    )


def _is_alive(node_id: str) -> bool:
    return any(node["NodeID"] == node_id and node["Alive"] for node in ray.nodes())


def _die_with_parent() -> None:
    """In the `ray start` child: get SIGTERM if pytest dies, so no node outlives a killed run."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _LocalRay:
    """The single in-process node behind ``local_ray``; stopped while a LocalCluster runs."""

    def __init__(self) -> None:
        self.context: RayContext | None = None
        self._temp_dir: Path | None = None

    def start(self) -> RayContext:
        if ray.is_initialized():
            raise RuntimeError(
                "local_ray: this process is already a Ray driver (of a LocalCluster?); a module "
                "must not request local_ray after a two_node_cluster test"
            )
        self._temp_dir = Path(tempfile.mkdtemp(prefix="apf-ray-local-"))
        enable_token_auth()
        with local_cluster_env(ExperimentConfig()):  # 127.0.0.1 only, like the CLI's local clusters
            self.context = ray.init(
                num_cpus=2,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
                _temp_dir=str(self._temp_dir),
            )
        return self.context

    def stop(self) -> None:
        if self.context is None:
            return
        ray.shutdown()
        self.context = None
        shutil.rmtree(self._temp_dir, ignore_errors=True)


_LOCAL_RAY = _LocalRay()


@pytest.fixture(scope="session")
def _local_ray_for_the_session() -> Iterator[_LocalRay]:
    """Stops the ``local_ray`` cluster when the session ends, whoever started it last."""
    yield _LOCAL_RAY
    _LOCAL_RAY.stop()


@pytest.fixture
def local_ray(_local_ray_for_the_session: _LocalRay) -> RayContext:
    """A 2-CPU single-node Ray cluster in this process, started once and kept for the session.

    Started again, as a new cluster, for the first test that asks for it after a
    ``two_node_cluster`` module stopped it; so tests may run in any order (``pytest -n``, the
    slow tests first) without a test finding Ray stopped.
    """
    return _LOCAL_RAY.context if _LOCAL_RAY.context is not None else _LOCAL_RAY.start()


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[LocalCluster]:
    """Head ``{"head_node": 1}`` and one worker ``{"edge_cpu": 4}``, 1 CPU each, per module.

    Stops ``local_ray`` while it runs (one process holds one Ray driver); the next test that
    asks for ``local_ray`` starts it again.
    """
    _LOCAL_RAY.stop()
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=1, resources=HEAD_RESOURCES)
        cluster.add_node(num_cpus=1, resources=EDGE_CPU_RESOURCES)
        yield cluster
