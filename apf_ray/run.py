"""One federated run: the round loop around a backend, with callbacks.

:func:`run` is the one entry point every front end uses (CLI, Python API, Ray Tune trials,
benchmarks): config → workload (built and checked here, before any cluster starts) →
backend (in-process or Ray) → rounds → callbacks (checkpointer, metrics writer, then the
caller's: progress display, Tune reporter, ...) → summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from apf_ray.backends import Backend, make_backend
from apf_ray.callbacks import Callback, Checkpointer, RunContext
from apf_ray.config import ExperimentConfig
from apf_ray.data import Dataset
from apf_ray.metrics import MetricsWriter, summarize
from apf_ray.resume import ResumePoint
from apf_ray.workload import build_workload


def default_run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    backend: str | Backend = "inprocess",
    backend_options: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    resume: ResumePoint | None = None,
    dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and return its summary (also in ``summary.json``).

    ``backend`` is ``"inprocess"``, ``"ray"``, an import path or an instance;
    ``backend_options`` go to its constructor (e.g. ``{"address": "127.0.0.1:6379"}``).
    ``resume`` continues from a checkpoint of the same run. ``dataset`` skips loading it
    (Tune shares one copy among trials).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    workload = build_workload(cfg, dataset)  # every data/model error surfaces here, before a cluster starts
    be = make_backend(backend, **(backend_options or {}))
    metrics = MetricsWriter()
    chain: list[Callback] = [Checkpointer(), metrics, *callbacks]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        info = be.start(cfg, run_dir, workload, resume)
        ctx = RunContext(cfg, run_dir, be, resume.round if resume else 0, info)
        for cb in chain:
            cb.on_start(ctx)
        done = ctx.start_round
        while done < cfg.train.rounds:
            event = be.run_round()
            for cb in chain:
                cb.on_round(event)
            done = event.record.round
        summary = summarize(cfg.to_dict(), metrics.history)
        summary["run_dir"] = str(run_dir)
        for cb in chain:
            cb.on_end(summary)
        return summary
    finally:
        metrics.close()
        be.close()
