"""Backends: where a run's clients execute. A new backend is one file.

Every backend runs the same round engine (:class:`apf_ray.engine.RoundEngine`: the server,
every client's strategy state, the checkpoint); a backend differs only in how a round's
client work executes. The round loop (:func:`apf_ray.run.run`) drives any :class:`Backend`
the same way: ``start`` once, ``run_round`` until done (``save_checkpoint`` when the
checkpointer asks), ``close``. Built in: ``inprocess`` (the reference: one process, no Ray)
and ``ray`` (``actors.backend:RayBackend``: the engine in a server actor, clients on
client-pool actors). The registry holds the Ray backend as an import path, so this package
never imports Ray or ``actors``; users name their own backend the same way
(``package.module:MyBackend``): usually an :class:`EngineBackend` that supplies a
:class:`~apf_ray.engine.ClientExecutor`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from apf_ray.aggregation import Partial
from apf_ray.client import ClientHost
from apf_ray.config import ExperimentConfig
from apf_ray.edge import edge_groups
from apf_ray.engine import ClientCall, ClientExecutor, RoundEngine
from apf_ray.plugins import resolve, subclass_of
from apf_ray.records import Broadcast, ClientResult, RoundEvent
from apf_ray.resume import ResumePoint
from apf_ray.workload import Workload

T = TypeVar("T")


class Backend(ABC):
    """Hosts one run's round engine and its clients, for the round loop.

    ``writes_in_background``: ``save_checkpoint(..., background=True)`` may return before the
    checkpoint is on disk, and :meth:`finish_checkpoint` waits for it.
    """

    writes_in_background = False

    @classmethod
    def session(cls, cfg: ExperimentConfig, **options: Any) -> contextlib.AbstractContextManager:
        """A context in which several runs share what this backend starts (Ray: one cluster)."""
        return contextlib.nullcontext()

    def check(self, cfg: ExperimentConfig) -> None:  # noqa: B027 - an optional hook
        """Refuse (SetupError), before anything starts, a config this backend could never run."""

    @abstractmethod
    def start(self, cfg: ExperimentConfig, run_dir: Path, workload: Workload,
              resume: ResumePoint | None) -> dict[str, Any]:
        """Bring the engine and clients up (restored from ``resume``); returns a start-up report."""

    @abstractmethod
    def run_round(self) -> RoundEvent:
        """Run the next round and return its event (without ``checkpoint``)."""

    @abstractmethod
    def save_checkpoint(self, callbacks: dict[str, Any], background: bool = False) -> Path:
        """Checkpoint the run as of its last finished round, with ``callbacks`` (each stateful
        callback's state by key); returns the checkpoint directory. ``background``: the write
        may go on while the next round runs (a backend may ignore it and write at once); the
        directory exists after :meth:`finish_checkpoint`."""

    def finish_checkpoint(self) -> None:  # noqa: B027 - only backends that write in the background need it
        """Wait until a checkpoint written in the background is on disk (its errors raise here)."""

    @abstractmethod
    def query(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(server, *args)`` where the engine runs, on its ``ServerCore``; the result comes back.

        What callbacks read the live run through (:class:`apf_ray.callbacks.RunView`). ``fn``
        must only read; on a remote engine it and its arguments travel by pickling.
        """

    @abstractmethod
    def close(self) -> None:
        """Release everything ``start`` acquired; safe to call more than once."""

    def abort(self) -> None:
        """Release everything at once, without waiting for work in flight (a second stop signal)."""
        self.close()


class EngineBackend(Backend):
    """A backend whose round engine runs in this process: a subclass supplies :meth:`executor`.

    ``name`` is what the start-up report calls it.
    """

    name = "engine"
    writes_in_background = True

    @abstractmethod
    def executor(self, cfg: ExperimentConfig, workload: Workload) -> ClientExecutor:
        """How this backend runs a round's clients (built once per run, in :meth:`start`)."""

    def start(self, cfg: ExperimentConfig, run_dir: Path, workload: Workload,
              resume: ResumePoint | None) -> dict[str, Any]:
        self.engine = RoundEngine(cfg, run_dir, workload, resume, self.executor(cfg, workload))
        return {"backend": self.name, **self.engine.info()}

    def run_round(self) -> RoundEvent:
        return self.engine.run_round()

    def save_checkpoint(self, callbacks: dict[str, Any], background: bool = False) -> Path:
        return self.engine.save_checkpoint(callbacks, background)

    def finish_checkpoint(self) -> None:
        self.engine.finish_checkpoint()

    def query(self, fn: Callable[..., T], *args: Any) -> T:
        return self.engine.query(fn, *args)

    def close(self) -> None:
        pass


class HostExecutor(ClientExecutor):
    """Trains every client on one :class:`ClientHost` in this process, one after another.

    Under aggregation on the way in it forms the groups the Ray backend's actors would
    (:func:`apf_ray.edge.edge_groups`: ``actors`` per pool, pools in ``pools`` order; a pool
    not named: one group) and returns one partial per group, so a run equals the Ray run with
    that layout bit for bit. Without ``pool_of_client``, all of a round's clients are one group.
    """

    def __init__(self, host: ClientHost, pool_of_client: Sequence[str] | None = None,
                 pools: Sequence[str] = (), actors: dict[str, int] | None = None) -> None:
        self.host = host
        self.pool_of_client, self.pools, self.actors = pool_of_client, list(pools), actors or {}

    def execute(self, broadcast: Broadcast,
                calls: Sequence[ClientCall]) -> tuple[list[ClientResult], dict[int, str], list[Partial]]:
        groups = ([share for _, share in edge_groups(calls, self.pool_of_client, self.pools, self.actors)]
                  if self.pool_of_client is not None else [list(calls)])
        results: list[ClientResult] = []
        partials: list[Partial] = []
        for group in groups:
            for item in self.host.stream(broadcast, group):
                (partials if isinstance(item, Partial) else results).append(item)
        return results, {}, partials


class InProcessBackend(EngineBackend):
    """The reference: every client trained by one :class:`ClientHost` in this process."""

    name = "inprocess"

    def executor(self, cfg: ExperimentConfig, workload: Workload) -> ClientExecutor:
        import torch

        torch.set_num_threads(cfg.cluster.torch_threads)  # as in a client actor; avoids oversubscription
        ds = workload.dataset
        host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
        host.add_clients(dict(enumerate(workload.partitions)))
        actors = {p.name: p.num_actors if isinstance(p.num_actors, int) else 1 for p in cfg.cluster.pools}
        return HostExecutor(host, workload.pool_of_client, [p.name for p in cfg.cluster.pools], actors)


BACKENDS: dict[str, type[Backend] | str] = {
    "inprocess": InProcessBackend,
    "ray": "actors.backend:RayBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The backend registered as ``name``, or a user's Backend subclass by import path."""
    return resolve(name, BACKENDS, "backend", check=subclass_of(Backend), expected="a Backend subclass")


def make_backend(backend: str | Backend, **options: Any) -> Backend:
    """A backend instance from a name, an import path, or an instance (returned as is)."""
    if isinstance(backend, Backend):
        return backend
    return backend_class(backend)(**options)
