"""Runs the reproduction's runs, up to ``jobs`` at a time, each in its own process; cached.

A run is *done* when its folder holds a ``summary.json`` for exactly its config (and the
probe's summary where it has one) and the worker's ``worker.json``: such a run is skipped, so
an interrupted ``apf-ray reproduce`` continues where it stopped (an interrupted run resumes
from its last checkpoint, see :mod:`reproduce.worker`). A continuation waits for the
run it continues. Everything but the report lives under ``OUTPUT/runs/`` (run folders, each
run's spec and log), so the report files can sit in a repository that ignores ``runs/``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from apf_ray.errors import Stopped
from apf_ray.resume import load_resume_point
from apf_ray.stability_probe import PROBE_DIR
from apf_ray.stops import StopSignals
from reproduce.plan import APF_T, RunSpec
from reproduce.worker import WORKER_FILE

PROGRESS_EVERY_S = 60.0  # seconds between progress lines while runs are going


def run_dir(out: Path, key: str) -> Path:
    return Path(out) / "runs" / key


def is_done(out: Path, spec: RunSpec) -> bool:
    d = run_dir(out, spec.key)
    path = d / "summary.json"
    if not path.is_file() or not (d / WORKER_FILE).is_file():
        return False
    summary = json.loads(path.read_text())
    if summary.get("config") != spec.config or summary.get("rounds") != spec.rounds:
        return False
    return not spec.probe or (d / PROBE_DIR / "summary.json").is_file()


def rounds_done(out: Path, key: str) -> int:
    """Rounds in a run's journal so far (what a progress line shows)."""
    path = run_dir(out, key) / "journal" / "rounds.jsonl"
    if not path.is_file():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


@dataclass
class _Running:
    spec: RunSpec
    proc: subprocess.Popen
    log: Path
    started: float
    signals: int = 0  # SIGINT/SIGTERM passed on to this worker so far


def run_all(specs: list[RunSpec], out: Path, *, jobs: int = 2, say: Callable[[str], None] = print,
            status: dict[str, str] | None = None) -> dict[str, str]:
    """Train every spec that is not done yet; returns key → ``cached`` | ``done`` | ``failed: why``.

    ``status`` (the caller's, filled in place) keeps what finished when the call is stopped.
    Workers run in their own session, so a terminal's Ctrl-C reaches them only through this
    process, which passes every SIGINT/SIGTERM it receives on to each worker once: at the first,
    no run starts and each running worker finishes and checkpoints its round in flight; a
    second makes them stop at once (their last checkpoints stay). Then
    :class:`~apf_ray.errors.Stopped` says what finished, what was kept, and how to resume.
    """
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    status = {} if status is None else status
    status.update({s.key: "cached" for s in specs if is_done(out, s)})
    pending = [s for s in specs if s.key not in status]
    if status:
        say(f"{len(status)} run(s) already done in {out / 'runs'}: {', '.join(status)}")
    if not pending:
        return status
    say(f"{len(pending)} run(s) to train, {jobs} at a time: {', '.join(s.key for s in pending)}")
    running: list[_Running] = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                     os.environ.get("PYTHONPATH")]))}
    abandoned = False
    with StopSignals(on_signal=lambda signum: _pass_on(running, signum)) as stops:
        stops.graceful = True  # the first signal only stops new runs; the workers see to their rounds
        try:
            _loop(pending, running, status, out, env, jobs, say, len(pending), stops)
        except KeyboardInterrupt:  # a further signal (passed on: the workers abandon their rounds)
            abandoned = True
        finally:  # stopped, or an error of ours: stop this invocation's workers, each checkpointing
            abandoned = _stop_workers(running, stops.signum or signal.SIGTERM) or abandoned
    if stops.requested:
        raise Stopped(stops.signum, _stop_message(specs, running, status, out, say, abandoned))
    return status


def _pass_on(running: list[_Running], signum: int) -> None:
    for r in running:
        if r.proc.poll() is None:
            r.proc.send_signal(signum)
        r.signals += 1


def _stop_workers(running: list[_Running], signum: int) -> bool:
    """Give each worker that has had no signal yet ``signum``, and wait for all; True if a further
    signal came meanwhile (it was passed on: the workers abandoned their rounds in flight)."""
    for r in running:
        if r.signals == 0:
            _pass_on([r], signum)
    abandoned = False
    while True:
        try:
            for r in running:
                r.proc.wait()
            return abandoned
        except KeyboardInterrupt:  # a further signal (passed on: the workers abandon their rounds)
            abandoned = True


def _stop_message(specs: list[RunSpec], running: list[_Running], status: dict[str, str], out: Path,
                  say: Callable[[str], None], abandoned: bool) -> str:
    """``stopped lenet5-apf after round 5 (1 of 4 runs done); resume with apf-ray reproduce --resume OUT``."""
    kept = []
    for r in running:
        if r.proc.returncode == 0 and is_done(out, r.spec):  # its last round ended as the signal came
            status[r.spec.key] = "done"
            continue
        try:
            kept.append(f"{r.spec.key} after round {load_resume_point(run_dir(out, r.spec.key)).round}")
        except (FileNotFoundError, ValueError):
            kept.append(f"{r.spec.key} before its first checkpoint")
        if r.proc.returncode not in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # not its own clean stop
            say(f"{r.spec.key}: exit code {r.proc.returncode} (log: {r.log})")
    done = sum(1 for s in specs if status.get(s.key) in ("cached", "done"))
    what = f"stopped {', '.join(kept)}" if kept else "stopped between runs"
    head = "abandoned the rounds in flight (second signal); " if abandoned and kept else ""
    return f"{head}{what} ({done} of {len(specs)} runs done); resume with apf-ray reproduce --resume {out}"


def _loop(pending: list[RunSpec], running: list[_Running], status: dict[str, str], out: Path, env: dict[str, str],
          jobs: int, say: Callable[[str], None], total: int, stops: StopSignals) -> None:
    finished = 0
    last_progress = time.monotonic()
    while (pending or running) and not stops.requested:
        for spec in list(pending):
            if len(running) >= jobs:
                break
            if spec.extends and spec.extends not in status:
                continue  # its source is still training
            pending.remove(spec)
            if spec.extends and status[spec.extends].startswith("failed"):
                status[spec.key] = f"failed: the run it continues ({spec.extends}) failed"
                continue
            running.append(_start(spec, out, env))
            say(f"started {spec.key} ({spec.label}, {spec.rounds} rounds)")
        time.sleep(0.5)
        for r in list(running):
            code = r.proc.poll()
            if code is None or stops.requested:
                continue
            running.remove(r)
            finished += 1
            took = time.monotonic() - r.started
            if code == 0 and is_done(out, r.spec):
                status[r.spec.key] = "done"
                say(f"[{finished}/{total}] {r.spec.key} finished in {took / 60:.1f} min")
            else:
                tail = r.log.read_text().strip().splitlines()[-8:] if r.log.is_file() else []
                status[r.spec.key] = f"failed: exit code {code} (log: {r.log})"
                say(f"[{finished}/{total}] {r.spec.key} FAILED (exit code {code}); last lines of {r.log}:\n  "
                    + "\n  ".join(tail))
        if running and time.monotonic() - last_progress >= PROGRESS_EVERY_S:
            last_progress = time.monotonic()
            say("  running: " + ", ".join(f"{r.spec.key} {rounds_done(out, r.spec.key)}/{r.spec.rounds}"
                                          for r in running))
        if not running and pending and all(s.extends and s.extends not in status for s in pending):
            for s in pending:  # cannot happen with a plan's ordering; never wait forever
                status[s.key] = f"failed: {s.extends} was never scheduled"
            pending.clear()


def _start(spec: RunSpec, out: Path, env: dict[str, str]) -> _Running:
    spec_path = out / "runs" / f"{spec.key}.spec.json"
    spec_path.write_text(json.dumps({
        "key": spec.key, "config": spec.config, "run_dir": str(run_dir(out, spec.key).resolve()),
        "probe": spec.probe, "probe_threshold": APF_T,
        "extends_dir": str(run_dir(out, spec.extends).resolve()) if spec.extends else None,
    }, indent=2))
    log = out / "runs" / f"{spec.key}.log"
    with log.open("a") as f:  # its own session: signals reach it once, from run_all
        proc = subprocess.Popen([sys.executable, "-m", "reproduce.worker", str(spec_path)],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(), start_new_session=True)
    return _Running(spec, proc, log, time.monotonic())
