"""Measure every number the README's Quickstart and Results sections quote, as a user would.

Each step runs a README command through the real command line (a subprocess, so Ray starts
and stops as it does for a user), times it, and writes one JSON file to ``docs/results/``
with the command, the numbers, the machine and its load (the README's tables are rendered
from these files by ``bench/readme_tables.py``):

- ``quickstart``: ``apf-ray train --config configs/digits-lenet5.yaml`` (Ray) → ``quickstart.json``
- ``default_compare``: ``apf-ray compare --config configs/digits-lenet5.yaml`` (Ray; fedavg,
  apf, apf:aggressive_prob=0.3; 100 rounds) → ``default_compare.json``
- ``all_strategies``: ``apf-ray compare --inprocess`` over every strategy and uplink stage at
  one threshold T = 0.2 (the strawmen would otherwise start from their own default 0.05)
  → ``all_strategies.json``
- ``test_suite``: the pytest part of the README's command 2 (``python3 -m pytest -q -n 2``) →
  ``test_suite.json`` (duration and counts)

The machine is shared: run it with ``nice -n 10`` (the niceness and the load average before,
during and after each step are recorded), e.g.

    nice -n 10 python3 bench/readme_results.py [--steps quickstart,default_compare,...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from provenance import RESULTS, LoadSampler, machine, now

REPO = RESULTS.parent.parent
DEFAULT_CONFIG = "configs/digits-lenet5.yaml"
ALL_STRATEGIES = ["fedavg", "apf", "partial_sync:threshold=0.2", "permanent:threshold=0.2", "apf+int8",
                  "fedavg+topk:ratio=0.1", "fedavg+gaia", "cmfl:threshold=0.5"]


def timed(argv: list[str]) -> tuple[float, str, dict[str, Any]]:
    """Run ``argv`` from the repository root; (wall seconds, its output, load report). Fails loudly."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print("$", shlex.join(argv), flush=True)
    with LoadSampler() as load:
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(argv)} failed ({proc.returncode}):\n{output[-3000:]}")
    print(f"  {wall:.0f} s, load {load.report()['mean_1min_during']}", flush=True)
    return wall, output, load.report()


def write(name: str, data: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    print(f"  wrote {path.relative_to(REPO)}", flush=True)
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "apf_ray.cli", *args]


def step_quickstart(tmp: Path) -> None:
    out = tmp / "quickstart"
    wall, _, load = timed(_cli("train", "--config", DEFAULT_CONFIG, "--output", str(out), "--quiet"))
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("config")
    summary.pop("run_dir", None)
    write("quickstart", {
        "command": f"apf-ray train --config {DEFAULT_CONFIG} --output runs/quickstart",
        "backend": "ray", "wall_s": round(wall, 1), "summary": summary,
        "date": now(), "machine": machine(),
        "load_average": load})


def _compare(name: str, tmp: Path, command: str, extra: list[str], note: str) -> None:
    out = tmp / name
    wall, _, load = timed(_cli("compare", "--config", DEFAULT_CONFIG, *extra, "--output", str(out), "--quiet"))
    report = json.loads((out / "compare.json").read_text())
    cfg = report["config"]
    write(name, {
        "command": command, "backend": "inprocess" if "--inprocess" in extra else "ray", "note": note,
        "workload": {"config": DEFAULT_CONFIG, "rounds": cfg["train"]["rounds"],
                     "clients_per_round": cfg["train"]["clients_per_round"],
                     "num_clients": cfg["data"]["num_clients"],
                     "shards_per_client": cfg["data"]["partition_options"].get("shards_per_client"),
                     "apf_threshold": cfg["strategy"]["options"].get("threshold")},
        "rows": report["rows"], "wall_s": round(wall, 1),
        "date": now(), "machine": machine(),
        "load_average": load})


def step_default_compare(tmp: Path) -> None:
    _compare("default_compare", tmp, f"apf-ray compare --config {DEFAULT_CONFIG}", [],
             "the README's default comparison: fedavg, apf, apf:aggressive_prob=0.3 on one local Ray cluster")


def step_all_strategies(tmp: Path) -> None:
    specs = " ".join(ALL_STRATEGIES)
    _compare("all_strategies", tmp, f"apf-ray compare --inprocess --config {DEFAULT_CONFIG} --strategies {specs}",
             ["--inprocess", "--strategies", *ALL_STRATEGIES],
             "every strategy and uplink stage; APF and both strawmen at T = 0.2 (partial_sync and permanent "
             "start from their own default T = 0.05 unless given :threshold=0.2), CMFL's own relevance "
             "threshold 0.5; in-process (a Ray run gives the same numbers)")


def step_test_suite(tmp: Path) -> None:
    """The README's command 2 after its install: the suite as a newcomer and CI run it."""
    command = subprocess.run([sys.executable, "scripts/deps.py", "readme-command", "2"], cwd=REPO, check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()  # as .ci/run reads it
    suite = command.split(" && ")[-1]
    argv = shlex.split(suite)
    wall, output, load = timed([sys.executable, *argv[1:], "-p", "no:cacheprovider"])
    tail = output.strip().splitlines()[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|errors?|xfailed)", tail)}
    write("test_suite", {"command": suite, "wall_s": round(wall, 1), "counts": counts,
                         "last_line": tail, "date": now(),
                         "machine": machine(), "load_average": load})


STEPS = {"quickstart": step_quickstart, "default_compare": step_default_compare,
         "all_strategies": step_all_strategies, "test_suite": step_test_suite}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    args = parser.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    with tempfile.TemporaryDirectory(prefix="apf-readme-") as tmp:
        for step in steps:
            print(f"[{step}]", flush=True)
            STEPS[step](Path(tmp))


if __name__ == "__main__":
    main()
