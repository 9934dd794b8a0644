"""Faults injected and bad inputs tried: what happened to the run (rounds lost, accuracy, message).

Two parts, one JSON file (``docs/results/faults.json``) and one Markdown table each:

- ``faults``: the default workload (digits, LeNet-5, APF, 10 of 20 non-IID clients per
  round, 100 rounds unless ``--rounds`` says otherwise), in-process (same numbers as Ray),
  once clean and once per injected fault at probability 0.3: failing clients and every
  ``faults.corrupt_kind`` under the default defence; then the boosted (``scale``, ×1000) update
  under the median, and with the norm bound switched off under each aggregation; then a
  sign-flipping update (×−10, mostly within the bound) from 10% of the clients under each.
- ``inputs``: the command line on Ray (``apf-ray train``, a local cluster) given each bad
  input, damaged or crafted checkpoint, and SIGINT / SIGTERM mid-run: exit status, seconds to
  exit (wall, and the CLI process's own CPU), the line it printed, what was left on disk.

    PYTHONPATH=. python3 bench/faults.py [--part faults|inputs|all] [--rounds 100]
                                         [--json docs/results/faults.json]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from provenance import LoadSampler, command, machine, now  # noqa: E402
from readme_tables import fault_table, input_table  # noqa: E402

from apf_ray.config import load_config  # noqa: E402
from apf_ray.metrics import read_journal  # noqa: E402
from apf_ray.resume import load_resume_point  # noqa: E402
from apf_ray.run import run  # noqa: E402

FAULT_PROB = 0.3
DEFAULT_CONFIG = REPO / "configs" / "digits-lenet5.yaml"


# ---------------------------------------------------------------------------------------- faults
def _scale(prob: float, *defence: str) -> list[str]:
    return [f"faults.corrupt_upload_prob={prob}", "faults.corrupt_kind=scale", *defence]


NO_BOUND = "defence.max_update_ratio=null"
FLIP = "faults.corrupt_scale=-10"  # an update pointing the wrong way, mostly within the default bound
MEDIAN = "defence.aggregation=median"
TRIMMED = ("defence.aggregation=trimmed_mean", "defence.trim_fraction=0.3")
FAULT_CASES: list[tuple[str, list[str]]] = [
    ("clean", []),
    ("clients fail (client_failure_prob)", [f"faults.client_failure_prob={FAULT_PROB}"]),
    *[(f"corrupt uploads: {kind}", [f"faults.corrupt_upload_prob={FAULT_PROB}", f"faults.corrupt_kind={kind}"])
      for kind in ("nan", "inf", "huge", "scale", "garbage", "samples")],
    ("scale, median (norm bound on)", _scale(FAULT_PROB, MEDIAN)),
    ("scale, norm bound off, mean", _scale(FAULT_PROB, NO_BOUND)),
    ("scale, norm bound off, median", _scale(FAULT_PROB, NO_BOUND, MEDIAN)),
    ("scale, norm bound off, trimmed mean 0.3", _scale(FAULT_PROB, NO_BOUND, *TRIMMED)),
    ("sign flip ×−10, p = 0.1, mean", _scale(0.1, FLIP)),
    ("sign flip ×−10, p = 0.1, median", _scale(0.1, FLIP, MEDIAN)),
    ("sign flip ×−10, p = 0.1, trimmed mean 0.3", _scale(0.1, FLIP, *TRIMMED)),
]


def fault_rows(rounds: int, work: Path) -> list[dict[str, Any]]:
    rows = []
    clean_acc = None
    for label, overrides in FAULT_CASES:
        cfg = load_config(DEFAULT_CONFIG, [f"train.rounds={rounds}", "output.tensorboard=false", "output.plots=false",
                                           *overrides])
        run_dir = work / f"fault-{len(rows)}"
        start = time.perf_counter()
        summary = run(cfg, run_dir)
        wall = time.perf_counter() - start
        clients = read_journal(run_dir, "clients")
        rejected = [c for c in clients if c["status"] == "rejected"]
        dropped = [c for c in clients if c["status"] in ("error", "timeout", "died", "no_actor")]
        rounds_rec = read_journal(run_dir, "rounds")
        acc = summary["final_accuracy"]
        clean_acc = acc if clean_acc is None else clean_acc
        example = (rejected or dropped or [{"error": ""}])[0]["error"]
        rows.append({
            "case": label,
            "overrides": overrides,
            "final_accuracy": acc,
            "best_accuracy": summary["best_accuracy"],
            "accuracy_change_points": round(100 * (acc - clean_acc), 1),
            "uploads_rejected": len(rejected),
            "clients_dropped": len(dropped),
            "rounds_quorum_missed": sum(not r["quorum_met"] for r in rounds_rec),
            "rounds_not_aggregated": sum(not r["aggregated"] for r in rounds_rec),
            "model_finite": bool(np.all(np.isfinite(load_resume_point(run_dir).server["params"]))),
            "example_message": example.splitlines()[0] if example else "",
            "wall_s": round(wall, 1),
        })
        print(f"  {label}: acc {acc:.3f}, rejected {len(rejected)}, dropped {len(dropped)}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------- inputs
def _cli(args: list[str], cwd: Path, sig: int | None = None, after_rounds: int = 0,
         run_dir: Path | None = None, group: bool = False) -> dict[str, Any]:
    """Run ``apf-ray train`` (as the console script does); optionally signal it after some rounds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "apf_ray.cli", "train", "--quiet", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    if sig is not None:
        journal = run_dir / "journal" / "rounds.jsonl"
        while proc.poll() is None and not (journal.is_file()
                                          and len(journal.read_text().splitlines()) >= after_rounds):
            time.sleep(0.05)
        (os.killpg if group else os.kill)(proc.pid, sig)
        start = time.perf_counter()  # for a signal, seconds from the signal to the exit
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in out.splitlines() if line.strip()]
    return {"exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "lines": lines,
            "traceback": "Traceback" in out}


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    magic = 0x0800 | array.ndim if magic is None else magic
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def _mnist_dir(path: Path, damage: str | None) -> Path:
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        _write_idx(path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    if damage == "truncated":
        gz = path / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:-20])
    elif damage == "magic":
        _write_idx(path / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10, magic=0x803)
    return path


def _snapshot(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


def _params(run_dir: Path) -> np.ndarray:
    return load_resume_point(run_dir).server["params"]


class _Trap:
    """Unpickling it would create ``marker``: proof that no code runs on --resume."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (self.marker,)


def input_rows(work: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    small = ["--set", "train.rounds=2", "--set", "output.checkpoint_every=1", "--set", "output.tensorboard=false",
             "--set", "output.plots=false"]
    base = work / "finished"
    print("  preparing a finished 2-round run", flush=True)
    done = _cli(["--inprocess", "--output", str(base), *small], cwd=work)
    assert done["exit"] == 0, done

    def case(label: str, args: list[str], folder: Path, expect_folder: bool, **kw: Any) -> dict[str, Any]:
        before = _snapshot(folder)
        res = _cli(args, cwd=work, **kw)
        after = _snapshot(folder)
        left = ("unchanged" if after == before else "changed") if before else ("created" if after else "none")
        said = [line for line in res["lines"] if line.startswith(("error:", "note:", "stopped", "abandoned"))]
        message = " / ".join(said) if said else (res["lines"][-1] if res["lines"] else "")
        row = {"case": label, "exit": res["exit"], "seconds": res["seconds"], "cpu_s": res["cpu_s"],
               "message": message.replace(str(work), "$TMP"),
               "output_lines": len(res["lines"]), "traceback": res["traceback"], "run_folder": left}
        rows.append(row)
        print(f"  {label}: exit {row['exit']} in {row['seconds']} s — {row['message'][:100]}", flush=True)
        return row

    def copy(name: str) -> Path:
        return Path(shutil.copytree(base, work / name))

    new = work / "new-run"
    case("unknown model name", ["--output", str(new), "--set", "model.name=no_such_net"], new, False)
    for label, damage in (("missing dataset folder", "missing"), ("truncated .gz", "truncated"),
                          ("wrong IDX magic number", "magic")):
        data = work / f"data-{damage}"
        if damage != "missing":
            _mnist_dir(data, damage)
        case(label, ["--output", str(new), "--set", "data.dataset=mnist_idx", "--set", f"data.options.path={data}",
                     "--set", "data.num_clients=4", "--set", "train.clients_per_round=2"], new, False)
    case("a pool no node can host", ["--output", str(new), "--set", "cluster.pools=[{name: big, num_cpus: 512}]"],
         new, False)
    case("--output onto a finished run", ["--output", str(copy("o1")), *small], work / "o1", True)
    case("--resume, a different model", ["--resume", str(copy("r1")), "--set", "model.name=resnet18"],
         work / "r1", True)
    case("--resume, another strategy", ["--resume", str(copy("r2")), "--set", "strategy.name=fedavg"],
         work / "r2", True)
    case("--resume with --config", ["--resume", str(copy("r3")), "--config", str(DEFAULT_CONFIG)], work / "r3", True)
    case("--resume with another --output", ["--resume", str(copy("r4")), "--output", str(work / "elsewhere")],
         work / "r4", True)

    crafted = copy("c1")
    newest = crafted / "checkpoints" / "round-00000002"
    with np.load(newest / "arrays.npz") as npz:
        members = {name: npz[name] for name in npz.files}
    members["a0"] = np.array([_Trap(work / "PWNED")], dtype=object)
    with (newest / "arrays.npz").open("wb") as f:
        np.savez(f, **members)
    manifest = json.loads((newest / "MANIFEST.json").read_text())
    data = (newest / "arrays.npz").read_bytes()
    manifest["files"]["arrays.npz"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "MANIFEST.json").write_text(json.dumps(manifest))
    row = case("--resume, crafted newest checkpoint (pickled object, matching checksums)",
               ["--resume", str(crafted)], crafted, True)
    row["code_ran"] = (work / "PWNED").exists()
    row["resumed_equals_uninterrupted"] = bool(_params(crafted).tobytes() == _params(base).tobytes())
    row["run_folder"] = (f"resumed from round {load_resume_point(crafted).round - 1}: "
                         f"{'equals' if row['resumed_equals_uninterrupted'] else 'DIFFERS FROM'} the uninterrupted "
                         f"run; {'CODE RAN' if row['code_ran'] else 'no code ran'}")

    truncated = copy("t1")
    arrays = truncated / "checkpoints" / "round-00000002" / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[: arrays.stat().st_size // 2])
    row = case("--resume, truncated newest checkpoint", ["--resume", str(truncated)], truncated, True)
    row["resumed_equals_uninterrupted"] = bool(_params(truncated).tobytes() == _params(base).tobytes())
    row["run_folder"] = (f"resumed from round {load_resume_point(truncated).round - 1}: "
                         f"{'equals' if row['resumed_equals_uninterrupted'] else 'DIFFERS FROM'} the uninterrupted run")

    # Signals mid-run on Ray: rounds of ~1 s, a checkpoint every 5 rounds.
    long = ["--set", "train.rounds=12", "--set", "output.checkpoint_every=5", "--set", "output.tensorboard=false",
            "--set", "output.plots=false"]
    reference = work / "reference"
    assert _cli(["--inprocess", "--output", str(reference), *long], cwd=work)["exit"] == 0
    for label, sig, group in (("SIGINT (Ctrl-C) mid-run", signal.SIGINT, True),
                              ("SIGTERM mid-run", signal.SIGTERM, False)):
        target = work / f"sig-{sig.name}"
        row = case(label, ["--output", str(target), *long], target, False, sig=sig, after_rounds=3,
                   run_dir=target, group=group)
        journal = len((target / "journal" / "rounds.jsonl").read_text().splitlines())
        row["checkpoint_round"] = load_resume_point(target).round
        row["rounds_done"] = journal
        row["rounds_lost"] = journal - row["checkpoint_round"]
        resumed = _cli(["--resume", str(target)], cwd=work)
        delta = float(np.max(np.abs(_params(target) - _params(reference))))
        row["resume_exit"] = resumed["exit"]
        row["resumed_max_abs_diff_vs_uninterrupted"] = delta
        row["resumed_bytes_equal"] = ([r["bytes_up"] for r in read_journal(target, "rounds")]
                                      == [r["bytes_up"] for r in read_journal(reference, "rounds")])
        row["run_folder"] = (f"checkpoint of round {row['checkpoint_round']} of {journal} done; resumed on Ray: "
                             f"max |Δw| vs the uninterrupted run {delta:.1g}, uplink bytes "
                             f"{'equal' if row['resumed_bytes_equal'] else 'DIFFER'}")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["faults", "inputs", "all"], default="all")
    p.add_argument("--rounds", type=int, default=100, help="rounds of the default workload per fault run")
    p.add_argument("--json", type=Path, default=REPO / "docs" / "results" / "faults.json")
    args = p.parse_args()
    result: dict[str, Any] = json.loads(args.json.read_text()) if args.json.is_file() else {}
    work = Path(tempfile.mkdtemp(prefix="apf-faults-"))
    try:
        with LoadSampler() as load:
            if args.part in ("faults", "all"):
                print("faults (in-process, default workload):", flush=True)
                result["faults"] = {"rounds": args.rounds, "probability": FAULT_PROB,
                                    "rows": fault_rows(args.rounds, work)}
            if args.part in ("inputs", "all"):
                print("bad inputs and signals (apf-ray train on Ray):", flush=True)
                result["inputs"] = {"rows": input_rows(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(date=now(), command=command(), machine=machine(), load_average=load.report())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if "faults" in result:
        print(fault_table(result["faults"]["rows"], result["faults"]["rounds"], FAULT_PROB))
    if "inputs" in result:
        print()
        print(input_table(result["inputs"]["rows"]))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
