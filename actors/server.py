"""Server actor: hosts the run's round engine, whose executor is the client pools."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors.pools import ClientPools
from apf_ray.client_store import open_store
from apf_ray.config import ExperimentConfig
from apf_ray.data import Dataset
from apf_ray.engine import RoundEngine
from apf_ray.records import RoundEvent
from apf_ray.resume import ResumePoint
from apf_ray.workload import Workload


@ray.remote(num_cpus=0, max_restarts=0)
class ServerActor:
    """Hosts the run's :class:`RoundEngine`; client work goes to its executor, :class:`ClientPools`.

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
        self.cfg = cfg
        # ``workload`` travels without its dataset; ``dataset`` is the shared object-store copy.
        workload.dataset = dataset
        self.pools = ClientPools(cfg, workload.pool_of_client, workload.partitions, dataset_ref[0],
                                 open_store(Path(run_dir)))
        self.engine = RoundEngine(cfg, run_dir, workload, resume, self.pools)
        del self._args

    def start(self) -> dict[str, Any]:
        """Build the server and the pools and start the pools' actors; :meth:`await_actors` waits for them."""
        self._setup()
        self.pools.refresh()
        return {"backend": "ray", **self.engine.info()}

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
        return self.engine.run_round()

    def save_checkpoint(self, callbacks: dict[str, Any], background: bool = False) -> str:
        """Checkpoint the run with the driver's callbacks' state (by key); the directory, as text.

        ``background``: written on a thread of this actor while the next round runs.
        """
        return str(self.engine.save_checkpoint(callbacks, background))

    def finish_checkpoint(self) -> None:
        """Wait for the background checkpoint write, if one is in flight."""
        self.engine.finish_checkpoint()

    def query(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(server, *args)`` on the engine's server (a callback's read of the live run)."""
        return self.engine.query(fn, *args)

    def describe(self) -> dict[str, list[dict]]:
        return self.pools.describe()

    def shutdown(self) -> None:
        if hasattr(self, "pools"):
            self.pools.shutdown()
