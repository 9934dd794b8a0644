"""``apf-ray reproduce``: the paper's experiments at the scale this machine allows, as a report.

:func:`reproduce` builds the plan (:mod:`.plan`: which runs each table and figure needs, at
``quick`` or ``full`` scale), measures Table III's overheads (:mod:`.overhead`) while nothing
else of ours runs, trains the runs not already in the output folder (:mod:`.runner`, each
in a :mod:`.worker` process, two at a time), and writes ``report.md``, the PNG plots and
``reproduce.json`` (:mod:`.report`) from the run folders.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apf_ray.provenance import LoadSampler, machine, now
from apf_ray.reproduce.plan import Plan, build_plan

__all__ = ["Plan", "build_plan", "reproduce"]


def reproduce(output: str | Path, *, quick: bool = False, only: list[str] | None = None, jobs: int = 2,
              cifar10: str | Path | None = None, tuned: str | Path | None = None, report_only: bool = False,
              command: str = "apf-ray reproduce", say: Callable[[str], None] = print,
              claim: Callable[[Path], None] | None = None) -> dict[str, Any]:
    """Run the selected experiments into ``output`` and write the report; returns ``reproduce.json``'s content.

    ``claim`` takes the output folder once the arguments are checked, before anything is written
    (the CLI holds it for the command's life: :class:`apf_ray.outputs.OutputClaim`).
    """
    from apf_ray.reproduce.report import write_report
    from apf_ray.reproduce.runner import run_all

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
    overhead_file = out / "runs" / "overhead.json"
    overhead = _cached_overhead(overhead_file, plan.scale)
    start = time.perf_counter()
    statuses: dict[str, str] = {}
    load = LoadSampler()
    try:
        with load:
            if not report_only:
                if "overhead" in selected and overhead is None:
                    from apf_ray.reproduce.overhead import measure_overhead

                    overhead = measure_overhead(plan, say)  # first, while no run of ours shares the cores
                    overhead_file.parent.mkdir(parents=True, exist_ok=True)
                    overhead_file.write_text(json.dumps({"scale": plan.scale, "models": overhead}, indent=2))
                run_all(specs, out, jobs=jobs, say=say, status=statuses)
    except BaseException:  # Ctrl-C, SIGTERM: the runs that finished still count, and so does the time spent
        if not report_only:
            _record_invocation(out, command, time.perf_counter() - start, load.report(), statuses, True)
        raise
    wall_s = time.perf_counter() - start
    invocations = _record_invocation(out, command, wall_s, load.report(), statuses, False)
    meta = {"command": command, "date": now(), "machine": machine(), "wall_s": wall_s, "load_average": load.report(),
            "jobs": jobs, "selected": selected, "invocations": invocations,
            "total_wall_s": sum(i["wall_s"] for i in invocations)}
    result = write_report(plan, out, statuses=statuses, meta=meta, overhead=overhead)
    failed = {k: v for k, v in statuses.items() if v.startswith("failed")}
    say(f"wrote {out / 'report.md'}, {len(result['plots'])} plots and {out / 'reproduce.json'}"
        + (f"; {len(failed)} run(s) failed: {', '.join(failed)}" if failed else ""))
    result["failed"] = failed
    return result


def _cached_overhead(path: Path, scale: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data["models"] if data.get("scale") == scale else None


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
