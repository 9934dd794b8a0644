"""The round engine: the one assembly of a run's server side, whatever executes its clients.

A run's server side is the same in every backend: :class:`~apf_ray.server.ServerCore` (the
global model, the strategy, sampling, aggregation, accounting), every client's strategy state
(error-feedback residuals, a partial-sync client's local values) and the run's checkpoint.
:class:`RoundEngine` builds them once, from the config, the workload and the resume point;
a backend only supplies a :class:`ClientExecutor`, the way a round's client work runs (one
:class:`~apf_ray.client.ClientHost` in this process, Ray client-pool actors, or a user's), as
Flower's simulation engine differs from its ``Backend``. The Ray server actor hosts a
``RoundEngine`` whose executor is the client pools, so both backends compute the same run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from apf_ray.aggregation import Partial
from apf_ray.checkpoint import CheckpointWriter
from apf_ray.client_store import ClientStateStore, StoredState, collect_garbage, fsync_files, import_states, open_store
from apf_ray.config import ExperimentConfig
from apf_ray.records import Broadcast, ClientResult, RoundEvent
from apf_ray.resume import ResumePoint, save_run_checkpoint
from apf_ray.server import ServerCore
from apf_ray.workload import Workload

ClientCall = tuple[int, StoredState | dict | None]
"""One client of a round and its strategy state from its previous round: its record in the run's
store (:mod:`apf_ray.client_store`), the state itself (shipped to a host that cannot see the store),
or None (it has none yet)."""

T = TypeVar("T")


class ClientExecutor(ABC):
    """How a round's client work runs; holds no state of its own between rounds.

    ``execute`` trains each ``(client id, strategy state)`` against the broadcast and returns
    the results that arrived (the updated state's record, or the state, rides in
    ``ClientResult.state``), the clients that never reported, with why (``timeout``, ``died``,
    ``no_actor``), and optionally the round's partial aggregates. When the broadcast asks for
    aggregation on the way in (``edge_bounds``), an executor may sum its groups' uploads where
    they train (``ClientHost.stream``: each result then carries its verdict, not its upload) and
    return one :class:`~apf_ray.aggregation.Partial` per group, in group order; results that still
    carry their upload are judged and summed by the server. The engine owns the records and the
    state lives in the run's store, so an
    executor may train any client anywhere and losing a worker loses no state.
    """

    @abstractmethod
    def execute(self, broadcast: Broadcast, calls: Sequence[ClientCall]) -> (
            tuple[list[ClientResult], dict[int, str]] | tuple[list[ClientResult], dict[int, str], list[Partial]]):
        """Train ``calls`` for ``broadcast``'s round: (results, missing client id → status[, partials])."""

    def take_events(self) -> list[str]:
        """What changed in the executor since the last call (Ray: actors added or dropped)."""
        return []


class RoundEngine:
    """One run's server side: the server core, every client's strategy state, the checkpoint.

    ``resume`` (checked by :func:`apf_ray.resume.check_resume`) restores the server and the
    clients' state as of its round. The clients' states are files of the run's store
    (``<run_dir>/client_state``, :mod:`apf_ray.client_store`), which the hosts that train them
    read and write; the engine keeps one :class:`StoredState` record per client.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, workload: Workload, resume: ResumePoint | None,
                 executor: ClientExecutor) -> None:
        self.cfg, self.run_dir, self.executor = cfg, Path(run_dir), executor
        self.server = ServerCore(cfg, workload)
        self.location = open_store(self.run_dir)
        self.store = ClientStateStore(self.location)  # writes the states hosts that cannot see it send back whole
        self.client_state: dict[int, StoredState] = {}
        self.writer = CheckpointWriter()
        self._durable_round = 0  # states written up to this round are fsynced (a checkpoint refers to them)
        if resume is not None:
            self.server.load_state_dict(resume.server)
            self.client_state = self._restore_states(resume)
            self._durable_round = resume.round
        collect_garbage(self.run_dir, self.location, self._live_files())

    def _restore_states(self, resume: ResumePoint) -> dict[int, StoredState]:
        """The clients' records as of ``resume``; states of a checkpoint taken in another store (a
        Tune copy of another trial's) are copied into this run's, and a checkpoint that holds the
        states themselves (written before the store existed) is written into it."""
        if resume.store_root is not None and resume.store_root.resolve() != Path(self.location.root):
            import_states(resume.stored, resume.store_root, self.location)
        states = dict(resume.stored)
        states.update({cid: self.store.save(cid, resume.round, state) for cid, state in resume.clients.items()})
        return states

    def _live_files(self) -> list[str]:
        return [name for stored in self.client_state.values() for name in stored.files()]

    def info(self) -> dict[str, Any]:
        """The start-up report's engine part: rounds done, parameter count (scalars)."""
        return {"round": self.server.round, "num_params": self.server.num_params}

    def _execute(self, broadcast: Broadcast,
                 clients: list[int]) -> tuple[list[ClientResult], dict[int, str], list[Partial]]:
        broadcast.client_store = self.location
        results, missing, *partials = self.executor.execute(broadcast,
                                                            [(c, self.client_state.get(c)) for c in clients])
        # The round changes the server's state from here on, and a background checkpoint of the
        # last round copies that state while the clients train: wait for its copy.
        self.writer.wait_copied()
        for res in results:
            if isinstance(res.state, StoredState):
                self.client_state[res.client_id] = res.state
            elif res.state is not None:  # from a host that cannot see the store
                self.client_state[res.client_id] = self.store.save(res.client_id, broadcast.round, res.state)
        return results, missing, partials[0] if partials else []

    def run_round(self) -> RoundEvent:
        """The next round; its event carries the executor's events (``pool_events``)."""
        event = self.server.run_round(self._execute)
        event.pool_events = self.executor.take_events()
        return event

    def save_checkpoint(self, callbacks: dict[str, Any] | None = None, background: bool = False) -> Path:
        """Checkpoint the run as of its last finished round, with the callbacks' state (by key).

        ``background``: written on a thread while the next round runs (its folder exists after
        :meth:`finish_checkpoint`); never two writes at once, so a save first waits for the last.
        The clients' state files it refers to are fsynced before it is written, and the store's
        files that neither it nor a checkpoint on disk refers to are deleted.
        """
        self.writer.wait()
        collect_garbage(self.run_dir, self.location, self._live_files())
        fresh = [name for stored in self.client_state.values() if stored.round > self._durable_round
                 for name in stored.files()]
        self._durable_round = self.server.round
        return save_run_checkpoint(self.run_dir, self.cfg, self.server, self.client_state, callbacks or {},
                                   self.writer if background else None, store=self.location,
                                   before_write=lambda: fsync_files(self.location, fresh))

    def finish_checkpoint(self) -> Path | None:
        """Wait for a background checkpoint write; its folder, or None if none was in flight."""
        return self.writer.wait()

    def query(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(server, *args)`` on this engine's :class:`ServerCore` (read it, never change it)."""
        return fn(self.server, *args)
