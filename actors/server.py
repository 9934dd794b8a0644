"""Server actor: owns the federated run (global model, controller, metrics, checkpoints)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from actors.pools import ClientPools
from apf_ray.config import ExperimentConfig
from apf_ray.federation import RoundRecord
from apf_ray.run import FederatedRun


@ray.remote(num_cpus=0, max_restarts=0)
class ServerActor:
    """Hosts :class:`FederatedRun`; client work goes to :class:`ClientPools`.

    ``num_cpus=0``: the server must never wait for a CPU that client actors hold, or
    ``ray.get`` on it hangs. It is pinned to the driver's node so the run directory is local.
    """

    def __init__(self, cfg_dump: dict, run_dir: str, resume_state: dict | None = None) -> None:
        import torch

        cfg = ExperimentConfig.model_validate(cfg_dump)
        torch.set_num_threads(cfg.cluster.torch_threads)
        self.cfg = cfg
        self.run = FederatedRun(cfg, Path(run_dir), resume_state=resume_state)
        ds = self.run.workload.dataset
        # The training arrays go into the object store once; actors read them zero-copy.
        data_refs = (ray.put(ds.x_train), ray.put(ds.y_train))
        self.pools = ClientPools(cfg, self.run.workload.client_pools, self.run.workload.partitions,
                                 data_refs, ds.num_classes, ds.input_shape)

    def start(self, startup_timeout_s: float = 180.0) -> dict[str, Any]:
        self.pools.wait_ready(set(self.pools.pools), startup_timeout_s, every_actor=True)
        return {"round": self.run.server.round, "num_params": self.run.server.num_params,
                "pools": self.pools.describe()}

    def run_round(self) -> tuple[RoundRecord, list[str]]:
        """One round; returns its record and the pool events (actors added or dropped)."""
        self.pools.refresh()
        rec = self.run.step(lambda b, c: self.pools.execute(b, c, self.cfg.cluster.round_timeout_s))
        events, self.pools.events = self.pools.events, []
        return rec, events

    def done(self) -> bool:
        return self.run.done

    def finish(self) -> dict[str, Any]:
        return self.run.finish()

    def describe(self) -> dict[str, list[dict]]:
        return self.pools.describe()

    def shutdown(self) -> None:
        self.pools.shutdown()
