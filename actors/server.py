"""Server actor: hosts the round's server core and the client pools, and writes checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from actors.pools import ClientPools
from apf_ray.config import ExperimentConfig
from apf_ray.data import Dataset
from apf_ray.records import RoundEvent
from apf_ray.resume import ResumePoint, save_run_checkpoint
from apf_ray.server import ServerCore
from apf_ray.workload import Workload


@ray.remote(num_cpus=0, max_restarts=0)
class ServerActor:
    """Hosts :class:`ServerCore`; client work goes to :class:`ClientPools`.

    ``num_cpus=0``: the server must never wait for a CPU that client actors hold, or
    ``ray.get`` on it hangs. It is pinned to the driver's node so the run directory is local.
    """

    def __init__(self, cfg_dict: dict, run_dir: str, dataset: Dataset, dataset_ref: list,
                 workload: Workload, resume: ResumePoint | None) -> None:
        # Only keep the arguments: set-up errors raised in ``start`` reach the driver as
        # that exception (a RayTaskError's cause), not as an ActorDiedError traceback.
        self._args = (cfg_dict, run_dir, dataset, dataset_ref, workload, resume)

    def _setup(self) -> None:
        import torch

        cfg_dict, run_dir, dataset, dataset_ref, workload, resume = self._args
        cfg = ExperimentConfig.model_validate(cfg_dict)
        torch.set_num_threads(cfg.cluster.torch_threads)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        # ``workload`` travels without its dataset; ``dataset`` is the shared object-store copy.
        workload.dataset = dataset
        self.server = ServerCore(cfg, workload)
        self.pools = ClientPools(cfg, workload.pool_of_client, workload.partitions, dataset_ref[0])
        if resume is not None:
            self.server.load_state_dict(resume.server)
            self.pools.client_state = dict(resume.clients)
        del self._args

    def start(self) -> dict[str, Any]:
        """Build the server and the pools and start the pools' actors; :meth:`await_actors` waits for them."""
        self._setup()
        self.pools.refresh()
        return {"backend": "ray", "round": self.server.round, "num_params": self.server.num_params}

    def await_actors(self, wait_s: float) -> dict[str, dict]:
        """Wait up to ``wait_s`` seconds for every pool's actors to start; how far each pool got.

        Short, so the driver can say what it waits for while it waits (``RayBackend.start``).
        """
        self.pools.wait_ready(set(self.pools.pools), self.cfg.cluster.startup_timeout_s, every_actor=True,
                              limit_s=wait_s)
        return self.pools.startup_status()

    def run_round(self) -> RoundEvent:
        """One round; its event carries the pool events (actors added or dropped)."""
        self.pools.refresh()
        event = self.server.run_round(self.pools.execute)
        event.pool_events, self.pools.events = self.pools.events, []
        return event

    def save_checkpoint(self) -> str:
        return str(save_run_checkpoint(self.run_dir, self.cfg, self.server, self.pools.client_state))

    def describe(self) -> dict[str, list[dict]]:
        return self.pools.describe()

    def shutdown(self) -> None:
        if hasattr(self, "pools"):
            self.pools.shutdown()
