"""``apf-ray reproduce``: the paper's experiments at the scale this machine allows, as a report.

:func:`reproduce` builds the plan (:mod:`.plan`: which runs each table and figure needs, at
``quick`` or ``full`` scale), measures Table III's overheads (:mod:`.overhead`) while nothing
else of ours runs, trains the runs not already in the output folder (:mod:`.runner`, each
in a :mod:`.worker` process, two at a time), and writes ``report.md``, the PNG plots and
``reproduce.json`` (:mod:`.report`) from the run folders.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apf_ray.errors import Stopped
from apf_ray.provenance import LoadSampler, machine, now
from apf_ray.stops import StopSignals
from reproduce.plan import Plan, build_plan

__all__ = ["Plan", "build_plan", "reproduce", "saved_options"]


OPTIONS_FILE = "options.json"
"""Under ``OUTPUT/runs/``: the last training invocation's options, which ``--resume OUTPUT`` repeats."""


def saved_options(output: str | Path) -> dict[str, Any]:
    """The options (``quick``, ``only``, ``jobs``, ``cifar10``, ``tuned``) :func:`reproduce` saved in ``output``."""
    path = Path(output) / "runs" / OPTIONS_FILE
    if not path.is_file():
        raise ValueError(f"{output} holds no apf-ray reproduce to resume (no runs/{OPTIONS_FILE}, which it writes "
                         "before its first run)")
    return json.loads(path.read_text())


def reproduce(output: str | Path, *, quick: bool = False, only: list[str] | None = None, jobs: int = 2,
              cifar10: str | Path | None = None, tuned: str | Path | None = None, report_only: bool = False,
              command: str = "apf-ray reproduce", say: Callable[[str], None] = print,
              claim: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run the selected experiments into ``output`` and write the report; returns ``reproduce.json``'s content.

    ``claim`` takes the output folder once the arguments are checked, before anything is written
    (the CLI holds it for the command's life: :class:`apf_ray.outputs.OutputClaim`).
    SIGINT/SIGTERM: while runs train, each checkpoints its round in flight (:func:`.runner.run_all`);
    before or after (overheads, the report) the invocation stops at once. Either way the
    invocation is recorded and :class:`~apf_ray.errors.Stopped` names the command that resumes.
    """
    from reproduce.report import write_report
    from reproduce.runner import run_all

    if jobs < 1:
        raise ValueError(f"--jobs {jobs}: at least one run must go at a time")
    out = Path(output)
    plan = build_plan(quick=quick, cifar10=Path(cifar10) if cifar10 else None,
                      tuned_file=Path(tuned) if tuned else None)
    selected = plan.select(only)
    specs = plan.runs_for(selected)
    if claim is not None:
        claim(out)
    for note in plan.notes:
        say(f"note: {note}")
    out.mkdir(parents=True, exist_ok=True)
    if not report_only:
        _save_options(out, quick=quick, only=only, jobs=jobs, cifar10=cifar10, tuned=tuned)
    overhead_file = out / "runs" / "overhead.json"
    overhead = _cached_overhead(overhead_file, plan.scale)
    start = time.perf_counter()
    statuses: dict[str, str] = {}
    load = LoadSampler()
    phase = "before its first run"
    try:
        with StopSignals() as stops:  # outside run_all's own handling nothing is in flight: a signal stops at once
            try:
                with load:
                    if not report_only:
                        if "overhead" in selected and overhead is None:
                            from reproduce.overhead import measure_overhead

                            phase = "while measuring overheads"
                            overhead = measure_overhead(plan, say)  # first, while no run of ours shares the cores
                            overhead_file.parent.mkdir(parents=True, exist_ok=True)
                            overhead_file.write_text(json.dumps(overhead, indent=2))
                        phase = "between runs"
                        run_all(specs, out, jobs=jobs, say=say, status=statuses)
            except BaseException:  # stopped (or failed): the runs that finished still count, and the time spent
                if not report_only:
                    _record_invocation(out, command, time.perf_counter() - start, load.report(), statuses, True)
                raise
            phase = "while writing the report"
            wall_s = time.perf_counter() - start
            invocations = _record_invocation(out, command, wall_s, load.report(), statuses, False)
            meta = {"command": command, "date": now(), "machine": machine(), "wall_s": wall_s,
                    "load_average": load.report(), "jobs": jobs, "selected": selected, "invocations": invocations,
                    "total_wall_s": sum(i["wall_s"] for i in invocations)}
            result = write_report(plan, out, statuses=statuses, meta=meta, overhead=overhead)
    except KeyboardInterrupt as stop:
        signum = stops.signal_of(stop)
        raise Stopped(signum, f"stopped by {signal.Signals(signum).name} {phase}; resume with "
                              f"apf-ray reproduce --resume {out}") from None
    failed = {k: v for k, v in statuses.items() if v.startswith("failed")}
    say(f"wrote {out / 'report.md'}, {len(result['plots'])} plots and {out / 'reproduce.json'}"
        + (f"; {len(failed)} run(s) failed: {', '.join(failed)}" if failed else ""))
    result["failed"] = failed
    return result


def _save_options(out: Path, *, quick: bool, only: list[str] | None, jobs: int, cifar10: str | Path | None,
                  tuned: str | Path | None) -> None:
    """What ``apf-ray reproduce --resume OUT`` repeats; paths absolute, so it may run from another folder."""
    path = out / "runs" / OPTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"quick": quick, "only": only, "jobs": jobs,
                                "cifar10": str(Path(cifar10).resolve()) if cifar10 else None,
                                "tuned": str(Path(tuned).resolve()) if tuned else None}, indent=2) + "\n")


def _cached_overhead(path: Path, scale: str) -> dict[str, Any] | None:
    """Table III's measurement from an earlier invocation at this scale (:func:`.overhead.measure_overhead`)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data if data.get("scale") == scale else None


def _record_invocation(out: Path, command: str, wall_s: float, load: dict[str, Any], statuses: dict[str, str],
                       interrupted: bool) -> list[dict[str, Any]]:
    """Every invocation so far, this one added if it trained (or, interrupted, started) a run."""
    trained = sorted(k for k, v in statuses.items() if v != "cached")
    current = {"command": command, "date": now(), "wall_s": wall_s, "load_average": load, "trained": trained,
               "interrupted": interrupted}
    return _invocations(out / "runs" / "invocations.json", current if trained or interrupted else None)


def _invocations(path: Path, current: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every invocation that trained runs into this output folder (the report's total time), oldest first."""
    history = json.loads(path.read_text()) if path.is_file() else []
    if current is not None:
        history.append(current)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(history, indent=2) + "\n")
    return history
