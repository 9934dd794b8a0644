"""Tuned APF against APF with the paper's defaults against FedAvg: LeNet-5 on Fashion-MNIST, 300 rounds.

Runs, as a user would, through the real command line:

1. ``apf-ray tune --config tune_configs/fashion-mnist-lenet5.yaml``: NSGA-II over T, α, Fc and p,
   8 trials and the FedAvg baseline of 300 rounds each, 2 at a time on a local Ray cluster;
2. ``apf-ray train --inprocess`` of APF with the paper's defaults (T = 0.05, α = 0.99, Fc = 1,
   p = 0) on the same workload and seed, 300 rounds;

then writes ``docs/results/tune_fashion_mnist.json`` (the three runs side by side: accuracy,
bytes, saving against FedAvg; every trial; the search's wall time, machine and load) and copies
the search's Pareto plot to ``docs/results/tune_fashion_mnist_pareto.png``. The tuned run is
the search's best trial itself (its own 300-round run), FedAvg is the search's baseline.

    nice -n 10 python3 bench/tune_fashion_mnist.py [--output runs/tune-fmnist] [--resume]

``--resume`` finishes an interrupted invocation in the same ``--output``: the search continues
with ``apf-ray tune --resume`` (finished trials are kept), the defaults run is retrained if it
did not finish, and the search time reported is the sum of both invocations' (``search_time_s``
lists each).

Needs Debian's ``dataset-fashion-mnist``. Long: about 10 × 300 rounds of 10 clients × 50 SGD
steps (2-3 s a round on one core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import yaml
from provenance import RESULTS, LoadSampler, command, machine, now

from apf_ray.derived import best_accuracy, final_accuracy, mean_of_last_accuracies, saving, total_bytes
from apf_ray.metrics import read_history

REPO = RESULTS.parent.parent
SEARCH = "tune_configs/fashion-mnist-lenet5.yaml"
CONFIG = "configs/fashion-mnist-lenet5.yaml"
PAPER_DEFAULTS = {"threshold": 0.05, "alpha": 0.99, "check_every": 1, "aggressive_prob": 0.0}


def _run(argv: list[str]) -> float:
    """Run ``argv`` from the repository root, streaming its output; its wall seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print("$", " ".join(argv), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed with exit code {proc.returncode}")
    return time.perf_counter() - start


def _summarise(label: str, run_dir: Path, baseline_total: float | None, settings: dict[str, Any]) -> dict[str, Any]:
    history = read_history(run_dir)
    last = history[-1]
    return {
        "run": label, "settings": settings, "rounds": last.round,
        "final_accuracy": final_accuracy(history), "best_accuracy": best_accuracy(history),
        "accuracy_last10": mean_of_last_accuracies(history, 10),
        "bytes_up": last.cum_bytes_up, "bytes_down": last.cum_bytes_down, "bytes_total": total_bytes(last),
        "saving_total": saving(total_bytes(last), baseline_total),
        "frozen_fraction_final": last.frozen_fraction, "run_dir": str(run_dir),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/tune-fmnist", help="where the search and the runs go")
    parser.add_argument("--smoke", action="store_true",
                        help="3 rounds, 2 trials, nothing written to docs/results: checks the pipeline")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted invocation in --output")
    args = parser.parse_args()
    out = (REPO / args.output).resolve()
    if out.exists() and not args.resume:
        sys.exit(f"{out} exists; move it away, pass another --output, or --resume it")
    if args.resume and not (out / "search").is_dir():
        sys.exit(f"{out / 'search'}: no search to resume")
    apf_ray = [sys.executable, "-m", "apf_ray.cli"]
    search, rounds = SEARCH, []
    if args.smoke and not args.resume:
        out.mkdir(parents=True)
        spec = yaml.safe_load((REPO / SEARCH).read_text())
        spec.update(base=str(REPO / CONFIG), num_samples=2)
        spec["overrides"]["train.rounds"] = 3
        search, rounds = str(out / "smoke.yaml"), ["--set=train.rounds=3"]
        Path(search).write_text(yaml.safe_dump(spec))
    timings = out / "timings.json"  # wall seconds of each invocation's search, kept across --resume
    earlier = json.loads(timings.read_text()) if timings.is_file() else {"search_s": [], "defaults_s": None}
    with LoadSampler() as search_load:
        search_args = ["--resume", str(out / "search")] if args.resume else ["--config", search, "--output",
                                                                              str(out / "search")]
        earlier["search_s"].append(_run([*apf_ray, "tune", *search_args]))
        timings.write_text(json.dumps(earlier))
    search_s = sum(earlier["search_s"])
    defaults_dir = out / "apf-paper-defaults"
    if args.resume and defaults_dir.exists() and earlier["defaults_s"] is None:
        shutil.move(defaults_dir, out / f"apf-paper-defaults.interrupted-{int(time.time())}")
    with LoadSampler() as defaults_load:
        if earlier["defaults_s"] is None:
            earlier["defaults_s"] = _run([*apf_ray, "train", "--inprocess", "--quiet", "--config", CONFIG, "--output",
                                          str(defaults_dir), *rounds,
                                          *[f"--set=strategy.options.{k}={v}" for k, v in PAPER_DEFAULTS.items()]])
            timings.write_text(json.dumps(earlier))
    defaults_s = earlier["defaults_s"]
    summary = json.loads((out / "search" / "summary.json").read_text())
    trials = pq.read_table(out / "search" / "trials.parquet").to_pylist()
    best = summary["best"]
    if best is None:
        sys.exit("the search chose no best trial (none completed)")
    baseline = _summarise("FedAvg", out / "search" / "baseline", None, {"strategy": "fedavg"})
    base_total = baseline["bytes_total"]
    tuned_params = {k.removeprefix("param:strategy.options."): v for k, v in best.items() if k.startswith("param:")}
    runs = [
        baseline,
        _summarise("APF, the paper's defaults", out / "apf-paper-defaults", base_total, PAPER_DEFAULTS),
        _summarise("APF, tuned", out / "search" / "trials" / best["trial_id"], base_total, tuned_params),
    ]
    results = out if args.smoke else RESULTS
    shutil.copy(out / "search" / "pareto.png", results / "tune_fashion_mnist_pareto.png")
    result = {
        "date": now(), "command": command(), "machine": machine(),
        "search_command": f"apf-ray tune --config {SEARCH}", "search_time_s": search_s,
        "search_invocations_s": earlier["search_s"],
        "search_time_note": "the sum of the invocations recorded in OUTPUT/timings.json; an invocation "
                            "killed before its search ended (a --resume follows it) is not counted",
        "defaults_command": f"apf-ray train --inprocess --config {CONFIG} "
                            + " ".join(f"--set strategy.options.{k}={v}" for k, v in PAPER_DEFAULTS.items()),
        "defaults_time_s": defaults_s,
        "load_average": search_load.report(), "load_average_defaults_run": defaults_load.report(),
        "note": "FedAvg is the search's baseline trial; the tuned run is the search's best trial (300 rounds each)",
        "runs": runs, "best_trial": best["trial_id"], "pareto": summary["pareto"],
        "trials": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in t.items()}
                   for t in trials],
    }
    path = results / "tune_fashion_mnist.json"
    path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"\n{'run':<28} {'acc last10':>10} {'final acc':>9} {'MB total':>9} {'saving':>7}")
    for r in runs:
        saving = "—" if r["saving_total"] is None else f"{r['saving_total']:.1%}"
        print(f"{r['run']:<28} {r['accuracy_last10']:>10.4f} {r['final_accuracy']:>9.4f} "
              f"{r['bytes_total'] / 1e6:>9.1f} {saving:>7}")
    print(f"search: {search_s / 60:.0f} min; wrote {path}")


if __name__ == "__main__":
    main()
