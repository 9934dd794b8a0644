"""One federated run: the round loop around ``ServerCore`` with metrics and checkpoints.

How client work is executed is passed in (``execute``): in-process for the reference loop,
Ray client pools in ``actors/``. Everything else — sampling, accounting, checkpointing,
resume — is here once.
"""

from __future__ import annotations

import pickle
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import yaml

from apf_ray.config import ExperimentConfig, build_config
from apf_ray.federation import Broadcast, ClientHost, ClientResult, RoundRecord, ServerCore, Workload, build_workload
from apf_ray.metrics import MetricsWriter, plot_history, summarize, write_summary

CHECKPOINT = "checkpoint.pkl"

# execute(broadcast, clients) -> (results, missing: client id -> reason)
Executor = Callable[[Broadcast, list[int]], tuple[list[ClientResult], dict[int, str]]]


def default_run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def load_checkpoint(run_dir: Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Config and server state of a run directory written by :class:`FederatedRun`."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} does not exist")
    with path.open("rb") as f:
        blob = pickle.load(f)
    return build_config(blob["config"], source=str(path)), blob["server"]


class FederatedRun:
    """Owns the server core, metrics and checkpoints of one run directory."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, workload: Workload | None = None,
                 resume_state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.workload = workload or build_workload(cfg)
        self.server = ServerCore(cfg, self.workload)
        if resume_state is not None:
            self.server.load_state_dict(resume_state)
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        self.metrics = MetricsWriter(
            self.run_dir,
            tensorboard=cfg.output.tensorboard,
            per_client=cfg.output.per_client_tensorboard,
            purge_step=self.server.round + 1 if resume_state is not None else None,
        )

    @property
    def done(self) -> bool:
        return self.server.round >= self.cfg.train.rounds

    def step(self, execute: Executor) -> RoundRecord:
        start = time.perf_counter()
        broadcast, clients = self.server.begin_round()
        down = self.server.downlink_bytes(clients, broadcast.plan)
        results, missing = execute(broadcast, clients)
        rec = self.server.finish_round(broadcast, clients, results, missing, down)
        rec.wall_s = time.perf_counter() - start
        n = len(clients)
        self.metrics.write_round(rec, self.server.client_history[-n:])
        every = self.cfg.output.checkpoint_every
        if (every and rec.round % every == 0) or self.done:
            self.checkpoint()
        return rec

    def checkpoint(self) -> Path:
        """Atomically write config + full server state (model, controller, RNGs, metrics)."""
        blob = {"config": self.cfg.model_dump(mode="json"), "server": self.server.state_dict()}
        tmp = self.run_dir / f".{CHECKPOINT}.tmp"
        with tmp.open("wb") as f:
            pickle.dump(blob, f, protocol=pickle.HIGHEST_PROTOCOL)
        path = self.run_dir / CHECKPOINT
        tmp.replace(path)
        self.metrics.write_tables(self.server.history, self.server.client_history)
        return path

    def finish(self) -> dict[str, Any]:
        history = self.server.history
        summary = summarize(self.cfg.model_dump(mode="json"), history)
        summary["run_dir"] = str(self.run_dir)
        write_summary(self.run_dir, summary)  # the tables were written by the final checkpoint
        if self.cfg.output.plots and history:
            plot_history(self.run_dir, {self.cfg.strategy.name: history})
        self.metrics.close()
        return summary


def run_inprocess(cfg: ExperimentConfig, run_dir: Path, *, resume_state: dict[str, Any] | None = None,
                  on_round: Callable[[RoundRecord], None] | None = None,
                  stop_after: int | None = None) -> dict[str, Any]:
    """The reference loop: one process, every client trained by one :class:`ClientHost`.

    ``stop_after`` ends the run early after that many rounds of this call (simulates a crash
    for resume tests; no summary is written).
    """
    import torch

    torch.set_num_threads(cfg.cluster.torch_threads)  # as in a client actor; avoids oversubscription
    run = FederatedRun(cfg, run_dir, resume_state=resume_state)
    ds = run.workload.dataset
    host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
    host.add_clients(dict(enumerate(run.workload.partitions)))

    def execute(b: Broadcast, clients: list[int]) -> tuple[list[ClientResult], dict[int, str]]:
        return host.run(b, clients), {}

    done_here = 0
    while not run.done:
        rec = run.step(execute)
        if on_round:
            on_round(rec)
        done_here += 1
        if stop_after is not None and done_here >= stop_after:
            run.metrics.close()
            return {"stopped_at": rec.round, "run_dir": str(run_dir)}
    return run.finish()
