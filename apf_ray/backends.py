"""Backends: where a run's server and clients execute. A new backend is one file.

The round loop (:func:`apf_ray.run.run`) drives any :class:`Backend` the same way:
``start`` once, ``run_round`` until done (``save_checkpoint`` when the checkpointer asks),
``close``. Built in: ``inprocess`` (the reference loop: one process, no Ray) and ``ray``
(``actors.backend:RayBackend``: a server actor and client-pool actors). The registry holds
the Ray backend as an import path, so this package never imports Ray or ``actors``; users
name their own backend the same way (``package.module:MyBackend``).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from apf_ray.client import ClientHost
from apf_ray.config import ExperimentConfig
from apf_ray.plugins import resolve, subclass_of
from apf_ray.records import Broadcast, ClientResult, RoundEvent
from apf_ray.resume import ResumePoint, save_run_checkpoint
from apf_ray.server import ServerCore
from apf_ray.workload import Workload


class Backend(ABC):
    """Hosts one run's server and clients."""

    @classmethod
    def session(cls, cfg: ExperimentConfig, **options: Any) -> contextlib.AbstractContextManager:
        """A context in which several runs share what this backend starts (Ray: one cluster)."""
        return contextlib.nullcontext()

    def check(self, cfg: ExperimentConfig) -> None:  # noqa: B027 - an optional hook
        """Refuse (SetupError), before anything starts, a config this backend could never run."""

    @abstractmethod
    def start(self, cfg: ExperimentConfig, run_dir: Path, workload: Workload,
              resume: ResumePoint | None) -> dict[str, Any]:
        """Bring the server and clients up (restored from ``resume``); returns a start-up report."""

    @abstractmethod
    def run_round(self) -> RoundEvent:
        """Run the next round and return its event (without ``checkpoint``)."""

    @abstractmethod
    def save_checkpoint(self) -> Path:
        """Checkpoint the run as of its last finished round; returns the checkpoint directory."""

    @abstractmethod
    def close(self) -> None:
        """Release everything ``start`` acquired; safe to call more than once."""

    def abort(self) -> None:
        """Release everything at once, without waiting for work in flight (a second stop signal)."""
        self.close()


class InProcessBackend(Backend):
    """The reference loop: every client trained by one :class:`ClientHost` in this process."""

    def start(self, cfg: ExperimentConfig, run_dir: Path, workload: Workload,
              resume: ResumePoint | None) -> dict[str, Any]:
        import torch

        torch.set_num_threads(cfg.cluster.torch_threads)  # as in a client actor; avoids oversubscription
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.server = ServerCore(cfg, workload)
        ds = workload.dataset
        self.host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
        self.host.add_clients(dict(enumerate(workload.partitions)))
        if resume is not None:
            self.server.load_state_dict(resume.server)
            self.host.state = dict(resume.clients)
        return {"backend": "inprocess", "round": self.server.round, "num_params": self.server.num_params}

    def _execute(self, broadcast: Broadcast, clients: list[int]) -> tuple[list[ClientResult], dict[int, str]]:
        return self.host.run(broadcast, clients), {}

    def run_round(self) -> RoundEvent:
        return self.server.run_round(self._execute)

    def save_checkpoint(self) -> Path:
        return save_run_checkpoint(self.run_dir, self.cfg, self.server, self.host.state)

    def close(self) -> None:
        pass


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
