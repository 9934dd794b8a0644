"""Real Ray clusters for tests: one in-process local node, or `ray start` nodes on this machine.

Load the fixtures from the test root's conftest with either
``pytest_plugins = ["tests.ray_cluster"]`` or ``from tests.ray_cluster import local_ray,
two_node_cluster``, not both. A process holds one Ray driver at a time, so ``two_node_cluster``
pauses the ``local_ray`` cluster for its module and restarts it afterwards.

Ray 2.60 facts this module is built on:
- Token auth is on by default. ``ray.init()`` without an address creates ``~/.ray/auth_token``
  and sets ``RAY_AUTH_MODE=token`` in its own process, but a process that joins a cluster at an
  explicit address (``ray start --address``, ``ray.init(address=...)``) must have
  ``RAY_AUTH_MODE=token`` itself, or it fails after ~20 s with ``ConnectionError``. Ray reads the
  variable when ``ray`` is imported, so setting it afterwards needs a config reload.
- ``ray stop`` stops every Ray process on the machine, so each node here is a
  ``ray start --block`` child in its own process group that is stopped by signal.
- SIGTERM to ``ray start --block`` drains the node for up to
  ``RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S`` (30 s by default) while actors live on it, so the
  nodes here run with 0 to stop at once.
- Every node's dashboard agent listens on port 52365 unless told otherwise; a node that finds it
  taken loses ~3.5 s retrying, so the nodes here get free ports.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pytest
import ray

if TYPE_CHECKING:
    from ray._private.worker import RayContext

# Small stores: the machine shares its RAM with other test runs.
LOCAL_OBJECT_STORE_BYTES = 300 * 1024**2
NODE_OBJECT_STORE_BYTES = 256 * 1024**2
HEAD_RESOURCES: dict[str, float] = {"head_node": 1}
EDGE_CPU_RESOURCES: dict[str, float] = {"edge_cpu": 4}

# `ray start` prints this once the node's processes are up.
_STARTED_MARKER = "Ray runtime started."
_NODE_ENV = {
    "RAY_AUTH_MODE": "token",
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # The head declares a killed node dead after 5 missed 1 s health checks (~6 s) instead
    # of Ray's default ~15 s, so crash tests stay short.
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}


def free_port() -> int:
    """A TCP port that is free now (another process may still take it before use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def enable_token_auth() -> None:
    """Make this process present the auth token when it joins a cluster by address.

    Setting ``RAY_AUTH_MODE`` after ``import ray`` is not enough: Ray caches its config at
    import, and the reload below is what Ray itself does when ``ray.init()`` turns auth on.
    """
    os.environ["RAY_AUTH_MODE"] = "token"
    ray._raylet.Config.initialize("")


def _ensure_auth_token() -> None:
    """Create ``~/.ray/auth_token`` unless a token already exists (file or RAY_AUTH_TOKEN*)."""
    subprocess.run(
        ["ray", "get-auth-token", "--generate"],
        check=True,
        stdout=subprocess.DEVNULL,  # the command prints the token itself
        stderr=subprocess.PIPE,
        timeout=60,
    )


@dataclass(frozen=True)
class ClusterNode:
    """One `ray start --block` process group; ``node_id`` is Ray's hex node id."""

    node_id: str
    num_cpus: int
    resources: dict[str, float]
    temp_dir: Path
    process: subprocess.Popen = field(repr=False, compare=False)

    @property
    def log_path(self) -> Path:
        """The `ray start` output, kept for diagnosing a node that failed to start."""
        return self.temp_dir / "ray_start.log"


class LocalCluster:
    """A multi-node Ray cluster of real `ray start` processes on this machine.

    ``start_head`` also connects the calling process as the driver, because node ids are read
    from the driver's view of the cluster. Use as a context manager, or call ``shutdown``.
    Stopping touches only the processes this object started, never other Ray clusters.
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
        self._root = Path(tempfile.mkdtemp(prefix="apf-ray-cluster-"))
        self._address: str | None = None
        self.head: ClusterNode | None = None
        self.workers: list[ClusterNode] = []

    @property
    def address(self) -> str:
        """``host:port`` of the head's GCS, the value for ``ray start --address``."""
        if self._address is None:
            raise RuntimeError("LocalCluster.address: the head node is not started")
        return self._address

    def start_head(
        self, *, num_cpus: int = 1, resources: dict[str, float] | None = None
    ) -> ClusterNode:
        """Start the head node and connect this process to it as the driver."""
        if self.head is not None:
            raise RuntimeError(f"LocalCluster: head already running at {self._address}")
        if ray.is_initialized():
            raise RuntimeError(
                "LocalCluster.start_head: this process is already a Ray driver; call "
                "ray.shutdown() first (the two_node_cluster fixture pauses local_ray)"
            )
        _ensure_auth_token()
        port = free_port()
        self._address = f"127.0.0.1:{port}"
        process, temp_dir = self._launch(
            ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
             "--include-dashboard=false"],
            num_cpus,
            resources or {},
        )
        enable_token_auth()
        ray.init(address=self._address, log_to_driver=False)
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
        """Stop one worker node and wait until the cluster marks it dead.

        ``graceful=True`` is SIGTERM (the raylet unregisters: its actors die at once);
        ``graceful=False`` is SIGKILL of the whole node, like a crashed machine, which the
        head only notices through missed health checks.
        """
        if node not in self.workers:
            raise ValueError(f"LocalCluster.remove_node: {node.node_id} is not a worker of this cluster")
        self._stop(node, signal.SIGTERM if graceful else signal.SIGKILL)
        self.workers.remove(node)
        self._wait_for(
            lambda: not self._alive(node.node_id),
            f"node {node.node_id} still alive {self.stop_timeout_s} s after it was stopped",
            self.stop_timeout_s,
        )

    def shutdown(self) -> None:
        """Disconnect the driver, stop every node this cluster started and delete its files."""
        if ray.is_initialized():
            ray.shutdown()
        for node in [*self.workers, *([self.head] if self.head else [])]:
            self._stop(node, signal.SIGTERM)
        self.workers.clear()
        self.head = None
        self._address = None
        shutil.rmtree(self._root, ignore_errors=True)

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
            f"--dashboard-agent-listen-port={free_port()}",
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
                start_new_session=True,  # its own process group, so we can signal all of it
            )

        def started() -> bool:
            if process.poll() is not None:
                raise RuntimeError(
                    f"`{' '.join(command)}` exited with {process.returncode}:\n{log_path.read_text()}"
                )
            return _STARTED_MARKER in log_path.read_text()

        self._wait_for(started, f"`ray start` not up after {self.start_timeout_s} s, see {log_path}",
                       self.start_timeout_s, on_timeout=lambda: _kill_group(process))
        return process, temp_dir

    def _register(
        self, process: subprocess.Popen, temp_dir: Path, num_cpus: int, resources: dict[str, float]
    ) -> ClusterNode:
        """Find the node's id: the alive node whose raylet socket lives under its temp dir."""
        found: list[str] = []

        def visible() -> bool:
            found[:] = [
                n["NodeID"] for n in ray.nodes()
                if n["Alive"] and n["RayletSocketName"].startswith(f"{temp_dir}/")
            ]
            return bool(found)

        self._wait_for(visible, f"node under {temp_dir} never appeared in ray.nodes()",
                       self.start_timeout_s)
        return ClusterNode(found[0], num_cpus, dict(resources), temp_dir, process)

    def _stop(self, node: ClusterNode, sig: signal.Signals) -> None:
        try:
            os.killpg(node.process.pid, sig)
            node.process.wait(timeout=self.stop_timeout_s)
        except ProcessLookupError:
            node.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(node.process)

    @staticmethod
    def _alive(node_id: str) -> bool:
        return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())

    @staticmethod
    def _wait_for(condition, message: str, timeout_s: float, on_timeout=None) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                if on_timeout is not None:
                    on_timeout()
                raise TimeoutError(f"LocalCluster: {message}")
            time.sleep(0.1)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


class _LocalRay:
    """The single in-process node behind ``local_ray``; it can be paused for a LocalCluster."""

    def __init__(self) -> None:
        self.context: RayContext | None = None
        self._temp_dir: Path | None = None

    @property
    def running(self) -> bool:
        return self.context is not None

    def start(self) -> RayContext:
        if ray.is_initialized():
            raise RuntimeError(
                "local_ray: this process is already a Ray driver (a LocalCluster?); tests that "
                "need local_ray must live in a module that does not use two_node_cluster"
            )
        self._temp_dir = Path(tempfile.mkdtemp(prefix="apf-ray-local-"))
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
def local_ray() -> Iterator[RayContext]:
    """A 2-CPU single-node Ray cluster in this process, started once per session."""
    if not _LOCAL_RAY.running:
        _LOCAL_RAY.start()
    yield _LOCAL_RAY.context
    _LOCAL_RAY.stop()


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[LocalCluster]:
    """Head ``{"head_node": 1}`` and one worker ``{"edge_cpu": 4}``, 1 CPU each, per module.

    Pauses ``local_ray`` while it runs: one process holds one Ray driver.
    """
    resume_local = _LOCAL_RAY.running
    _LOCAL_RAY.stop()
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=1, resources=HEAD_RESOURCES)
        cluster.add_node(num_cpus=1, resources=EDGE_CPU_RESOURCES)
        yield cluster
    if resume_local:
        _LOCAL_RAY.start()
