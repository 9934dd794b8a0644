"""The scale table of an earlier commit and of this tree, side by side: row by row, alternating.

"Rounds no slower than before" is a claim only when both versions ran on the same machine at the
same time: on a shared machine, two runs of ``bench/scale.py`` hours apart differ by tens of
percent in a round's time. This runs each row of the table twice, once with the code at
``--before`` (a temporary git worktree, removed at the end) and once with this tree, each as its
own ``bench/scale.py --only ROW`` process with its own Ray cluster, and alternates which goes
first from row to row, so a change in the machine's load falls on both. It writes the two tables
where the README reads them (``scale_before.json`` and ``scale.json``: the second with the
table's goals) and prints each row's median round after/before.

    python3 bench/scale_versus.py --before 182f6de [--rounds 3] [--only ROW ...]

A row the earlier code cannot run (its ``bench/scale.py`` refuses the row, or skips it for
memory) is recorded as skipped with its reason. Each finished row is kept in ``--work``; rerunning
the same command after a stop measures only the rows still missing (an after-row is reused only
when it was measured with the same code as now).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import REPO, RESULTS, LoadSampler, code, command, machine, now
from scale import ROW_KEYS, combinations, goals, parse_only, print_goals, print_table, row_name

SIDES = ("before", "after")


def measure_row(tree: Path, combo: dict, rounds: int, out: Path) -> tuple[dict, bool]:
    """One row (``ROW_KEYS``) measured by ``tree``'s ``bench/scale.py`` in a new process (its output shown),
    and whether to keep it for a rerun: the row as that script records it, or a skipped row naming why
    the code there could not run it (kept only when that code has no such row; a failure is tried again)."""
    cmd = [sys.executable, "bench/scale.py", "--rounds", str(rounds), "--only", row_name(combo), "--json", str(out)]
    with subprocess.Popen(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            _, stderr = proc.communicate()
        except KeyboardInterrupt:  # let the row stop its own Ray cluster: a terminal's Ctrl-C reached it
            try:                   # too; a signal sent to this process alone is passed on
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                proc.wait(timeout=120)
            raise
    if proc.returncode in (-signal.SIGINT, 128 + signal.SIGINT):
        raise KeyboardInterrupt
    report = json.loads(out.read_text()) if proc.returncode == 0 else {"rows": []}
    if len(report["rows"]) != 1:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        why = (f"its bench/scale.py failed on this row (exit {proc.returncode}): {last}" if proc.returncode
               else "its bench/scale.py has no such row")
        return {**combo, "skipped": why}, proc.returncode == 0
    (measured,) = report["rows"]
    return {**measured, "code": report["code"], "run_load_average": report["load_average"],
            "run_total_s": report["total_s"]}, True


def side_report(rows: list[dict], side: str, versus: dict, load: dict, started: float) -> dict:
    """One side's table in ``bench/scale.py``'s format, with how the two sides were run."""
    codes = sorted({r["code"] for r in rows if "code" in r})
    return {"command": command(), "code": ", ".join(codes), "date": now(), "machine": machine(), "load_average": load,
            "benchmark": f"server scaling with virtual clients and clients per round ({side}, side by side)",
            "versus": versus, "total_s": time.perf_counter() - started,
            "rows": [{k: v for k, v in r.items() if k != "code"} for r in rows], "goals": goals(rows)}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    # Ctrl-C and SIGTERM stop it, however it was started (a shell's background job ignores SIGINT,
    # and so would every row it starts); a handler, unlike an ignored signal, is not inherited.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, metavar="REV", help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (round 1 is not in the medians)")
    parser.add_argument("--only", nargs="*", default=None, metavar="MODEL:N:K[:UPLINK]",
                        help="only these rows of the table (bench/scale.py --only)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where finished rows are kept (default runs/scale-versus/<rev>-rounds<R>)")
    parser.add_argument("--json-before", type=Path, default=RESULTS / "scale_before.json")
    parser.add_argument("--json", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is not measured)")
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "--verify", f"{args.before}^{{commit}}"],
                         capture_output=True, text=True, check=False)
    if rev.returncode != 0:
        parser.error(f"--before {args.before}: not a commit of {REPO}")
    before_rev = rev.stdout.strip()
    combos = [dict(zip(ROW_KEYS, c, strict=True))
              for c in combinations(parse_only(args.only, parser) if args.only else None)]
    work = args.work or REPO / "runs" / "scale-versus" / f"{before_rev}-rounds{args.rounds}"
    for side in SIDES:
        (work / side).mkdir(parents=True, exist_ok=True)
    now_code = code()
    versus = {"before": f"commit {before_rev}", "after": now_code, "rounds": args.rounds,
              "order": "each row once per side, in new processes; before first on even rows, after first on odd"}
    print(f"scale table, {len(combos)} rows, before = commit {before_rev}, after = this tree ({now_code}); "
          f"rows kept in {work}", flush=True)
    started = time.perf_counter()
    measured: dict[str, list[dict]] = {side: [] for side in SIDES}
    tree = Path(tempfile.mkdtemp(prefix=f"apf-scale-{before_rev}-"))
    try:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--quiet", "--detach", str(tree), before_rev],
                       check=True)
        with LoadSampler() as load:
            for i, combo in enumerate(combos):
                row = row_name(combo)
                print(f"[{i + 1}/{len(combos)}] {row}", flush=True)
                for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                    out = work / side / f"{row.replace(':', '-')}.json"
                    kept = json.loads(out.read_text()) if out.is_file() else None
                    if kept is None or (side == "after" and kept.get("code") != now_code):
                        print(f"  {side} ...", flush=True)
                        kept, keep = measure_row(tree if side == "before" else REPO, combo, args.rounds, out)
                        kept.setdefault("code", f"commit {before_rev}" if side == "before" else now_code)
                        if keep:
                            out.write_text(json.dumps(kept, indent=1) + "\n")
                        else:
                            out.unlink(missing_ok=True)
                    measured[side].append({"uplink": "apf", **kept})  # rows from before uplinks had none
    except KeyboardInterrupt:
        print(f"stopped; rerun the same command to continue ({work} keeps the rows measured)", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tree, ignore_errors=True)
    reports = {side: side_report(measured[side], side, versus, load.report(), started) for side in SIDES}
    for side in SIDES:
        print(f"\n{side}:")
        print_table(reports[side]["rows"])
    print("\nmedian round, after / before:")
    for b, a in zip(reports["before"]["rows"], reports["after"]["rows"], strict=True):
        ratio = ("-" if "skipped" in a or "skipped" in b else f"{a['median_wall_s'] / b['median_wall_s']:.2f}")
        print(f"{row_name(a):>24} {ratio:>6}")
    print_goals(reports["after"]["goals"])
    for side, path in (("before", args.json_before), ("after", args.json)):
        path.write_text(json.dumps(reports[side], indent=2, allow_nan=False) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
