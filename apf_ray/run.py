"""One federated run: the round loop around a backend, with callbacks.

:func:`run` is the one entry point every front end uses (CLI, Python API, Ray Tune trials,
benchmarks): config → workload and resume point (built and checked here, before any cluster
starts) → backend (its round engine in-process or in a Ray actor) → run folder → rounds →
callbacks (the caller's with state, checkpointer, metrics writer, the caller's others: progress
display, Tune reporter, ...) → summary. Callbacks have a lifecycle (:mod:`apf_ray.callbacks`):
``on_end`` runs however the run ends, after ``on_exception`` if a round or a callback raised.

First the run folder is claimed (:mod:`apf_ray.outputs`: one writer at a time; a path that
cannot be written fails here, before any data loads or cluster starts). Nothing else is
written before the backend started: a run that cannot start (a bad model name, missing data,
a checkpoint of another run, a pool no node can host) raises
:class:`~apf_ray.errors.SetupError` and leaves no run folder. A folder that already holds a
run (or a search) is never replaced silently (``overwrite`` removes only the files the earlier
run listed as its own), and SIGINT/SIGTERM stop the loop cleanly (:mod:`apf_ray.stops`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from apf_ray.backends import Backend, make_backend
from apf_ray.callbacks import Callback, Checkpointer, RunView, stateful_callbacks
from apf_ray.checkpoint import CHECKPOINT_FILES, list_checkpoints
from apf_ray.client_store import STORE_DIR, discard_if_unused
from apf_ray.config import ConfigError, ExperimentConfig
from apf_ray.data import Dataset
from apf_ray.edge import check_round_memory
from apf_ray.errors import RunStopped, SetupError, describe
from apf_ray.flat import FlatLayout
from apf_ray.metrics import MetricsWriter, summarize
from apf_ray.outputs import OutputClaim, clear_run, record, record_tree, refuse_for_run
from apf_ray.resume import ResumePoint, check_resume
from apf_ray.stops import StopSignals
from apf_ray.workload import build_workload


def default_run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.output.dir:
        return Path(cfg.output.dir)
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _set_up(cfg: ExperimentConfig, run_dir: Path, backend: str | Backend, backend_options: dict[str, Any],
            resume: ResumePoint | None, dataset: Dataset | None, overwrite: bool,
            resume_may_change: Sequence[str],
            keyed: dict[str, Callback]) -> tuple[Backend, dict[str, Any], FlatLayout]:
    """Check everything that can be checked, then start the backend; SetupError on any failure.

    ``keyed``: the callbacks with state, by key; resuming, the checkpoint must hold each one's.
    """
    if resume is None:
        refuse_for_run(run_dir, overwrite)
    else:
        lacking = [key for key in keyed if key not in resume.callbacks]
        if lacking:
            raise SetupError(f"checkpoint {resume.path} holds no state of the callback(s) {', '.join(lacking)}: "
                             "a callback that keeps state resumes only a run it followed from the start")
    be = None
    try:
        be = make_backend(backend, **backend_options)
        be.check(cfg)  # e.g. a pool no node of a local cluster can host
        workload = build_workload(cfg, dataset)  # every data/model error surfaces here, before a cluster starts
        check_round_memory(cfg, workload.init_params.size, workload.init_buffers.size)
        if resume is not None:
            check_resume(cfg, resume, workload, resume_may_change)
        return be, be.start(cfg, run_dir, workload, resume), workload.layout
    except BaseException as err:
        if be is not None:
            be.abort()  # nothing to save, and a server actor busy starting must not be waited for
        if isinstance(err, (SetupError, ConfigError)) or not isinstance(err, Exception):
            raise  # already one line, or a signal (Abandon) / exit
        raise SetupError(describe(err)) from err


def _summary(cfg: ExperimentConfig, run_dir: Path, metrics: MetricsWriter) -> dict[str, Any]:
    return {**summarize(cfg.to_dict(), metrics.history), "run_dir": str(run_dir)}


def _end(started: list[Callback], summary: dict[str, Any]) -> list[Exception]:
    """Every started callback's ``on_end`` (each once, even if one before it raised); what they raised."""
    errors = []
    while started:
        cb = started.pop(0)
        try:
            cb.on_end(summary)
        except Exception as err:
            errors.append(err)
    return errors


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
    claim: bool = True,
) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` and return its summary (also in ``summary.json``).

    ``backend`` is ``"inprocess"``, ``"ray"``, an import path or an instance;
    ``backend_options`` go to its constructor (e.g. ``{"address": "127.0.0.1:6379"}``).
    ``resume`` continues from a checkpoint of the same run (the config may change only what
    :func:`apf_ray.resume.check_resume_config` allows, and the dotted fields in
    ``resume_may_change``). ``dataset`` skips loading it (Tune
    shares one copy among trials). ``overwrite`` replaces a run already in ``run_dir``
    (otherwise that is a SetupError): it removes what the earlier run listed as its own
    (:func:`apf_ray.outputs.clear_run`), and ``RunView.info["replaced"]`` says what.
    ``claim`` holds the folder for the run's life (:class:`apf_ray.outputs.OutputClaim`: a
    second writer is refused, an unusable path is a SetupError before anything starts); False
    where the caller already owns it (a Tune trial inside the search its driver claimed: Tune
    may restart a trial while the previous attempt is still shutting down).

    Raises SetupError (or ConfigError) if the run cannot start, and RunStopped after a
    SIGINT/SIGTERM (in the main thread). An error in a round or a callback reaches every
    started callback's ``on_exception``, then ``on_end`` (``summary["failed"]``), then the caller.
    """
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    start_round = resume.round if resume else 0
    try:
        keyed = stateful_callbacks(callbacks)
    except ValueError as err:
        raise SetupError(str(err)) from None
    with StopSignals() as stops, OutputClaim(run_dir) if claim else contextlib.nullcontext():
        found_store = (run_dir / STORE_DIR).exists()  # an earlier run's: never this one's to remove
        try:
            be, info, layout = _set_up(cfg, run_dir, backend, backend_options or {}, resume, dataset, overwrite,
                                       resume_may_change, keyed)
        except KeyboardInterrupt as stop:  # Abandon, or Ray's plain KeyboardInterrupt in its place
            if not found_store:
                discard_if_unused(run_dir)
            raise RunStopped(start_round, stops.signal_of(stop), run_dir, checkpointed=resume is not None) from None
        except BaseException:  # refused: nothing of this run is left behind but what it found
            if not found_store:
                discard_if_unused(run_dir)
            raise
        stops.graceful = True  # from here on, a first signal lets the round in flight finish
        metrics = MetricsWriter()
        def save(background: bool) -> Path:
            states = {k: cb.state_dict() for k, cb in keyed.items()}
            return be.save_checkpoint(states, background=True) if background else be.save_checkpoint(states)

        # Written in the background while the next round runs where the backend can, unless a
        # callback hands each checkpoint on as soon as it is taken (Tune's reporter).
        checkpointer = Checkpointer(save, be.writes_in_background and not any(
            getattr(cb, "needs_written_checkpoints", False) for cb in callbacks))
        others = [cb for cb in callbacks if cb not in keyed.values()]
        chain: list[Callback] = [*keyed.values(), checkpointer, metrics, *others]  # why: apf_ray.callbacks
        started: list[Callback] = []  # on_start ran, on_end not yet
        last_checkpoint = start_round if resume is not None else None
        done = start_round
        abandoned = False
        try:
            if overwrite and resume is None:
                info["replaced"] = clear_run(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            record(run_dir, "config.yaml", STORE_DIR)  # the store's files: apf_ray.client_store cleans up its own
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            for key, cb in keyed.items():
                if resume is not None:
                    cb.load_state_dict(resume.callbacks[key])
            view = RunView(cfg, run_dir, start_round, info, layout, be)
            for cb in chain:
                cb.on_start(view)
                started.append(cb)
            while done < cfg.train.rounds and not stops.requested:
                event = be.run_round()
                done = event.record.round
                for cb in chain:
                    cb.on_round(event)
                if event.checkpoint is not None:
                    last_checkpoint = done
                    record_tree(run_dir, event.checkpoint, CHECKPOINT_FILES)
            stopped = stops.requested and done < cfg.train.rounds
            if stopped and last_checkpoint != done:
                # the round that was in flight when the signal came
                record_tree(run_dir, checkpointer.save(False), CHECKPOINT_FILES)
                last_checkpoint = done
            be.finish_checkpoint()
            summary = _summary(cfg, run_dir, metrics)
            if stopped:
                summary["stopped"] = {"round": done, "signal": stops.signum}
            errors = _end(started, summary)
            if errors:
                raise errors[0]
            if stopped:
                raise RunStopped(done, stops.signum, run_dir)
            return summary
        except KeyboardInterrupt as stop:
            abandoned = True
            _end(started, {**_summary(cfg, run_dir, metrics), "abandoned": {"round": done, "signal": stops.signum}})
            written = list_checkpoints(run_dir)  # a background write cut short is not one of them
            raise RunStopped(written[-1][0] if written else 0, stops.signal_of(stop), run_dir, abandoned=True,
                             checkpointed=bool(written)) from None
        except Exception as err:
            try:
                be.finish_checkpoint()  # what was being written stays resumable
            except Exception as late:
                err.add_note(f"then the checkpoint being written failed too: {describe(late)}")
            for cb in started:
                try:
                    cb.on_exception(err)
                except Exception as late:  # noted on the error on its way out, not lost
                    err.add_note(f"then {type(cb).__name__}.on_exception failed too: {describe(late)}")
            failed = {**_summary(cfg, run_dir, metrics), "failed": {"round": done, "error": describe(err)}}
            for late in _end(started, failed):
                err.add_note(f"then on_end failed too: {describe(late)}")
            raise
        finally:
            metrics.close()
            if not abandoned:
                try:
                    be.close()
                except KeyboardInterrupt:  # a second signal while closing (Ray shutting down): stop at once
                    abandoned = True
            if abandoned:
                be.abort()
