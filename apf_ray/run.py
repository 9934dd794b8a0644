"""One federated run: the round loop around a backend, with callbacks.

:func:`run` is the one entry point every front end uses (CLI, Python API, Ray Tune trials,
benchmarks): config → workload and resume point (built and checked here, before any cluster
starts) → backend (in-process or Ray) → run folder → rounds → callbacks (checkpointer,
metrics writer, then the caller's: progress display, Tune reporter, ...) → summary.

Nothing is written before the backend started: a run that cannot start (a bad model name,
missing data, a checkpoint of another run, a pool no node can host) raises
:class:`~apf_ray.errors.SetupError` and leaves no run folder. A folder that already holds a
run is never replaced silently (``overwrite``), and SIGINT/SIGTERM stop the loop cleanly
(:mod:`apf_ray.stops`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from apf_ray.backends import Backend, make_backend
from apf_ray.callbacks import Callback, Checkpointer, RunContext
from apf_ray.config import ConfigError, ExperimentConfig
from apf_ray.data import Dataset
from apf_ray.errors import RunStopped, SetupError, describe
from apf_ray.metrics import MetricsWriter, summarize
from apf_ray.resume import ResumePoint, check_resume
from apf_ray.stops import StopSignals
from apf_ray.variants import PLAN_FILE
from apf_ray.workload import build_workload

RUN_FILES = ("config.yaml", "summary.json", "rounds.parquet", "clients.parquet", "layers.parquet", "curves.png",
             "compare.json", "compare.png", PLAN_FILE, "journal", "checkpoints", "tensorboard")
"""What a run (or a compare) writes into its folder; ``overwrite`` removes these and nothing else."""


def default_run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_files(run_dir: Path) -> list[str]:
    """The run outputs present in ``run_dir`` (empty: no run there)."""
    run_dir = Path(run_dir)
    return [name for name in RUN_FILES if (run_dir / name).exists()] if run_dir.is_dir() else []


def clear_run(run_dir: Path) -> list[str]:
    """Remove a previous run's outputs from ``run_dir`` (other files stay); returns what was removed."""
    removed = run_files(run_dir)
    for name in removed:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def _refuse_existing(run_dir: Path, overwrite: bool) -> None:
    found = run_files(run_dir)
    if found and not overwrite:
        raise SetupError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                         f"--resume {run_dir}, or replace it with --overwrite")


def _set_up(cfg: ExperimentConfig, run_dir: Path, backend: str | Backend, backend_options: dict[str, Any],
            resume: ResumePoint | None, dataset: Dataset | None, overwrite: bool,
            resume_may_change: Sequence[str]) -> tuple[Backend, dict[str, Any]]:
    """Check everything that can be checked, then start the backend; SetupError on any failure."""
    if resume is None:
        _refuse_existing(run_dir, overwrite)
    be = None
    try:
        be = make_backend(backend, **backend_options)
        be.check(cfg)  # e.g. a pool no node of a local cluster can host
        workload = build_workload(cfg, dataset)  # every data/model error surfaces here, before a cluster starts
        if resume is not None:
            check_resume(cfg, resume, workload, resume_may_change)
        return be, be.start(cfg, run_dir, workload, resume)
    except BaseException as err:
        if be is not None:
            be.abort()  # nothing to save, and a server actor busy starting must not be waited for
        if isinstance(err, (SetupError, ConfigError)) or not isinstance(err, Exception):
            raise  # already one line, or a signal (Abandon) / exit
        raise SetupError(describe(err)) from err


def run(
    cfg: ExperimentConfig,
    run_dir: str | Path | None = None,
    *,
    backend: str | Backend = "inprocess",
    backend_options: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
    resume: ResumePoint | None = None,
    dataset: Dataset | None = None,
    overwrite: bool = False,
    resume_may_change: Sequence[str] = (),
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and return its summary (also in ``summary.json``).

    ``backend`` is ``"inprocess"``, ``"ray"``, an import path or an instance;
    ``backend_options`` go to its constructor (e.g. ``{"address": "127.0.0.1:6379"}``).
    ``resume`` continues from a checkpoint of the same run (the config may change only what
    :func:`apf_ray.resume.check_resume_config` allows, and the dotted fields in
    ``resume_may_change``). ``dataset`` skips loading it (Tune
    shares one copy among trials). ``overwrite`` replaces a run already in ``run_dir``
    (otherwise that is a SetupError); ``RunContext.info["replaced"]`` lists what was removed.

    Raises SetupError (or ConfigError) if the run cannot start, and RunStopped after a
    SIGINT/SIGTERM (in the main thread).
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    start_round = resume.round if resume else 0
    with StopSignals() as stops:
        try:
            be, info = _set_up(cfg, run_dir, backend, backend_options or {}, resume, dataset, overwrite,
                               resume_may_change)
        except KeyboardInterrupt as stop:  # Abandon, or Ray's plain KeyboardInterrupt in its place
            raise RunStopped(start_round, stops.signal_of(stop), run_dir, checkpointed=resume is not None) from None
        stops.graceful = True  # from here on, a first signal lets the round in flight finish
        metrics = MetricsWriter()
        chain: list[Callback] = [Checkpointer(), metrics, *callbacks]
        last_checkpoint = start_round if resume is not None else None
        abandoned = False
        try:
            if overwrite and resume is None:
                info["replaced"] = clear_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            ctx = RunContext(cfg, run_dir, be, start_round, info)
            for cb in chain:
                cb.on_start(ctx)
            done = start_round
            while done < cfg.train.rounds and not stops.requested:
                event = be.run_round()
                for cb in chain:
                    cb.on_round(event)
                done = event.record.round
                if event.checkpoint is not None:
                    last_checkpoint = done
            stopped = stops.requested and done < cfg.train.rounds
            if stopped and last_checkpoint != done:
                be.save_checkpoint()  # the round that was in flight when the signal came
                last_checkpoint = done
            summary = summarize(cfg.to_dict(), metrics.history)
            summary["run_dir"] = str(run_dir)
            if stopped:
                summary["stopped"] = {"round": done, "signal": stops.signum}
            for cb in chain:
                cb.on_end(summary)
            if stopped:
                raise RunStopped(done, stops.signum, run_dir)
            return summary
        except KeyboardInterrupt as stop:
            abandoned = True
            raise RunStopped(last_checkpoint or 0, stops.signal_of(stop), run_dir, abandoned=True,
                             checkpointed=last_checkpoint is not None) from None
        finally:
            metrics.close()
            if not abandoned:
                try:
                    be.close()
                except KeyboardInterrupt:  # a second signal while closing (Ray shutting down): stop at once
                    abandoned = True
            if abandoned:
                be.abort()
