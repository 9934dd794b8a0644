"""apf-ray on Ray against Flower's Ray simulation: the same federated workload, side by side.

Workload (identical on both sides): LeNet-5 on scikit-learn's digits upsampled to 1x28x28
(``digits`` with ``size: 28``), 100 clients with two label shards each (apf-ray's ``shards``
partitioner), K clients per round, 10 local SGD steps per client (batch 16, lr 0.05, no
momentum), the global model evaluated on the test split after every round, 2 client actors of
1 CPU each on a fresh local Ray cluster of this machine's 2 CPUs. apf-ray runs it twice, with
FedAvg (every scalar, the same work as Flower's FedAvg) and with APF (the default workload's
T = 0.2); Flower runs FedAvg.

This script builds the dataset, the partitions, the initial model and every round's sampled
clients (with their per-client seeds) ONCE with apf-ray's own functions (``build_workload``,
``sampling_schedule``, ``client_seed``) and saves them to an .npz. apf-ray's runs rebuild the
same workload from the same config and sample the same clients (checked afterwards from their
journals); the Flower side (``bench/flower_side.py``, run with the Flower virtualenv's Python
from ``bench/setup_flower_venv.sh``) reads the .npz and trains with the same LeNet-5 class and
minibatch schedule, and averages with apf-ray's arithmetic, so apf-ray's FedAvg and Flower end
with bit-identical models -- checked.

Each (system, K, repetition) is one fresh process; the systems' order rotates every
repetition so that drift on a shared machine hits all of them. Measured per run:

* round wall time, from the start of round r (sampling) to its aggregated model evaluated:
  apf-ray ``RoundRecord.wall_s`` (in the server actor); Flower ``configure_train(r)`` entry to
  ``evaluate_fn(r)`` exit (in the ServerApp thread). The first ``--warmup`` rounds are dropped.
* its ratio to the plain-loop lower bound: the round's K sampled clients' 10 steps each timed
  in this process in a bare torch loop with one thread (``flower_side.local_sgd``), summed and
  divided by the 2 actors; and to the same bound with the loop timed in 2 processes at once,
  as the 2 actors run (on a 2-core machine other jobs share, each gets less than one alone).
* start-up: process spawn to training starting (apf-ray: server and all client actors ready;
  Flower: its first ClientApp call), and spawn to round 1's model evaluated.
* peak RSS (and PSS) of the whole process tree (driver, GCS, raylet, agents, actors).
* bytes per round, each side as it counts them: apf-ray's wire buffers (uplink + downlink);
  Flower's ``message_size_mod`` count of the round's train messages and replies.
* apf-ray's server phases per round (``RoundRecord.phase_s``), and the masked local step
  (APF, half the scalars frozen) against the unmasked one in a bare loop on this workload.

    python3 bench/vs_flower.py [--clients 10,50,100] [--rounds 6] [--warmup 1] [--reps 2]
                               [--flower-python bench/.venv-flower/bin/python] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path[:0] = [str(REPO), str(BENCH)]

import ray  # noqa: E402 - before orchestration: puts the psutil Ray bundles on the path
from orchestration import MemorySampler  # noqa: E402 - bench/ on the path first
from provenance import RESULTS, LoadSampler, code, command, machine, now  # noqa: E402

SEED = 0
NUM_CLIENTS = 100
SHARDS_PER_CLIENT = 2
IMAGE_SIZE = 28
LOCAL_STEPS = 10
BATCH_SIZE = 16
LR = 0.05
ACTORS = 2
ACTOR_CPUS = 1
OBJECT_STORE_MB = 512
DEFAULT_CLIENTS = (10, 50, 100)
RUN_TIMEOUT_S = 900
SYSTEMS = ("fedavg", "apf", "flower")
"""apf-ray with FedAvg, apf-ray with APF, Flower with FedAvg."""
APF_THRESHOLD = 0.2  # the default workload's T (configs/digits-lenet5.yaml)


# =========================================================================== shared workload
def bench_config(k: int, rounds: int, run_dir: Path, strategy: str = "fedavg"):
    """apf-ray's config of the workload (also the source of the arrays both sides use)."""
    from apf_ray.config import build_config

    raw = {
        "name": f"vs-flower-{strategy}-k{k}",
        "seed": SEED,
        "data": {"dataset": "digits", "options": {"size": IMAGE_SIZE}, "partitioner": "shards",
                 "partition_options": {"shards_per_client": SHARDS_PER_CLIENT}, "num_clients": NUM_CLIENTS},
        "model": {"name": "lenet5"},
        "train": {"rounds": rounds, "clients_per_round": k, "local_steps": LOCAL_STEPS, "batch_size": BATCH_SIZE,
                  "lr": LR, "momentum": 0.0, "weight_decay": 0.0, "eval_every": 1},
        "strategy": {"name": strategy, "options": {"threshold": APF_THRESHOLD} if strategy == "apf" else {}},
        "cluster": {"pools": [{"name": "cpu", "num_actors": ACTORS, "num_cpus": ACTOR_CPUS}],
                    "round_timeout_s": RUN_TIMEOUT_S, "torch_threads": 1, "object_store_mb": OBJECT_STORE_MB},
        "output": {"dir": str(run_dir), "checkpoint_every": 0, "tensorboard": False, "plots": False},
    }
    return build_config(raw, source="bench/vs_flower.py")


def write_shared(path: Path, clients: list[int], rounds: int) -> dict[str, Any]:
    """Build the workload once with apf-ray's functions and save what the Flower side needs."""
    from apf_ray.workload import build_workload, client_seed, sampling_schedule

    wl = build_workload(bench_config(clients[0], rounds, path.parent))  # K does not change the workload
    ds = wl.dataset
    sizes = np.array([len(p) for p in wl.partitions])
    arrays = {
        "x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test,
        "partition_indices": np.concatenate(wl.partitions),
        "partition_offsets": np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        "init_params": wl.init_params, "num_classes": np.int64(ds.num_classes),
        "input_shape": np.array(ds.input_shape, dtype=np.int64),
    }
    for k in clients:
        schedule = np.array(sampling_schedule(SEED, NUM_CLIENTS, k, rounds), dtype=np.int64)
        arrays[f"sample_k{k}"] = schedule
        arrays[f"seed_k{k}"] = np.array([[client_seed(SEED, r + 1, c) for c in row] for r, row in enumerate(schedule)],
                                        dtype=np.int64)
    np.savez(path, **arrays)
    return {"train_samples": len(ds.y_train), "test_samples": len(ds.y_test), "input_shape": list(ds.input_shape),
            "num_params": int(wl.init_params.size),
            "samples_per_client": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())}}


def client_compute_times(npz: Path, repeats: int = 3) -> np.ndarray:
    """Seconds of each client's local steps in a bare torch loop, 1 thread (median of ``repeats``)."""
    import torch
    from flower_side import load_shared, local_sgd

    torch.set_num_threads(1)
    data = load_shared(npz)
    model = data.model()
    times = np.zeros((repeats, len(data.partitions)))
    for c, idx in enumerate(data.partitions[:3]):  # warm-up: the first calls allocate
        local_sgd(model, data.x_train[idx], data.y_train[idx], steps=LOCAL_STEPS, batch_size=BATCH_SIZE, lr=LR, seed=c)
    for rep in range(repeats):
        for c, idx in enumerate(data.partitions):
            x, y = data.x_train[idx], data.y_train[idx]
            start = time.perf_counter()
            local_sgd(model, x, y, steps=LOCAL_STEPS, batch_size=BATCH_SIZE, lr=LR, seed=1000 * rep + c)
            times[rep, c] = time.perf_counter() - start
    return np.median(times, axis=0)


def client_compute_times_side_by_side(npz: Path) -> np.ndarray:
    """:func:`client_compute_times` in ``ACTORS`` processes at once, averaged over them.

    The rounds run ``ACTORS`` busy client actors beside each other; on a machine with few cores
    that other jobs share, one process alone gets more of the machine than each of them does, so
    the bound timed alone is lower than what the actors can reach. Timed side by side, the loop
    faces the same share of the cores (Ray's own processes and the server aside).
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(ACTORS) as pool:
        return np.mean(pool.map(client_compute_times, [npz] * ACTORS), axis=0)


def masked_step_cost(npz: Path, clients: int = 20, repeats: int = 5) -> dict[str, Any]:
    """apf-ray's local training with APF's mask (half the scalars frozen) against without, same clients.

    Interleaved per client so both see the same machine load; medians of per-client seconds.
    """
    import torch
    from flower_side import load_shared

    from apf_ray.training import TrainSettings, train_local

    torch.set_num_threads(1)
    data = load_shared(npz)
    model = data.model()
    settings = TrainSettings(local_steps=LOCAL_STEPS, batch_size=BATCH_SIZE, lr=LR)
    mask = np.random.default_rng(0).random(data.init_params.size) < 0.5
    none = np.zeros(0, np.float32)
    seconds: dict[str, list[float]] = {"unmasked": [], "masked": []}
    for rep in range(repeats + 1):
        for c, idx in enumerate(data.partitions[:clients]):
            for kind, m in (("unmasked", None), ("masked", mask)) if (rep + c) % 2 == 0 else \
                    (("masked", mask), ("unmasked", None)):
                out = train_local(model, data.x_train[idx], data.y_train[idx], params=data.init_params, buffers=none,
                                  mask=m, settings=settings, seed=c)
                if rep:  # the first pass warms up
                    seconds[kind].append(out.compute_s)
    med = {k: float(np.median(v)) for k, v in seconds.items()}
    return {"clients": clients, "repeats": repeats, "frozen_fraction": float(1 - mask.mean()),
            "median_client_s": med, "masked_over_unmasked": med["masked"] / med["unmasked"]}


def same_arithmetic_check(npz: Path, k: int) -> dict[str, Any]:
    """One client's round-1 training: apf-ray's ``train_local`` against the Flower client's loop."""
    from flower_side import load_shared, local_sgd

    from apf_ray.flat import get_params
    from apf_ray.training import TrainSettings, train_local

    data = load_shared(npz)
    with np.load(npz) as z:
        cid, seed = z[f"sample_k{k}"][0, 0].item(), z[f"seed_k{k}"][0, 0].item()
    idx = data.partitions[cid]
    ours = train_local(data.model(), data.x_train[idx], data.y_train[idx], params=data.init_params,
                       buffers=np.zeros(0, np.float32), mask=None,
                       settings=TrainSettings(local_steps=LOCAL_STEPS, batch_size=BATCH_SIZE, lr=LR), seed=seed)
    model = data.model()
    local_sgd(model, data.x_train[idx], data.y_train[idx], steps=LOCAL_STEPS, batch_size=BATCH_SIZE, lr=LR, seed=seed)
    theirs = get_params(model)
    return {"client": cid, "bit_identical": bool(ours.params.tobytes() == theirs.tobytes()),
            "max_abs_diff": float(np.abs(ours.params - theirs).max())}


# =========================================================================== one run, in a child process
def run_system(system: str, k: int, rounds: int, npz: Path, workdir: Path, flower_python: Path, tag: str) -> dict:
    """Run one system in a fresh process; returns its timings, bytes, memory and final model's path."""
    out_json, out_params = workdir / f"{tag}.json", workdir / f"{tag}-params.npy"
    spec = {"system": system, "k": k, "rounds": rounds, "npz": str(npz), "out": str(out_json),
            "out_params": str(out_params), "num_clients": NUM_CLIENTS, "local_steps": LOCAL_STEPS,
            "batch_size": BATCH_SIZE, "lr": LR, "cluster_cpus": ACTORS * ACTOR_CPUS, "actor_cpus": ACTOR_CPUS,
            "object_store_mb": OBJECT_STORE_MB, "run_dir": str(workdir / f"{tag}-run"), "aggregation": "apf"}
    spec_path = workdir / f"{tag}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(BENCH), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_USAGE_STATS_ENABLED"] = "0"  # loopback only: no usage reports
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # Flower posts telemetry events to its server otherwise
    env.pop("RAY_ADDRESS", None)
    if system == "flower":
        cmd = [str(flower_python), str(BENCH / "flower_side.py"), str(spec_path)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--apf-side", str(spec_path)]
    log_path = workdir / f"{tag}.log"
    load_before = os.getloadavg()
    with log_path.open("w") as log:
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with MemorySampler(tree=True, root=proc.pid) as memory:
            try:
                rc = proc.wait(timeout=RUN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
        t_exit = time.time()
    leftovers = end_leftovers(memory)
    if rc != 0 or not out_json.is_file():
        raise RuntimeError(f"{system} K={k} exited with {rc}; log {log_path}:\n{log_path.read_text()[-4000:]}")
    raw = json.loads(out_json.read_text())
    res = summarise_flower(raw) if system == "flower" else summarise_apf(raw)
    mem = memory.report()
    res.update(system=system, k=k, tag=tag, process_wall_s=t_exit - t_spawn,
               startup_s=res.pop("t_training_start") - t_spawn, first_round_done_s=res.pop("t_round1_end") - t_spawn,
               memory={key: mem[key] for key in ("peak_total_rss_mb", "peak_total_pss_mb", "peak_rss_mb_by_kind",
                                                 "client_actor_peak_rss_mb", "server_actor_peak_rss_mb",
                                                 "driver_peak_rss_mb")},
               load_average_before=load_before, load_average_after=os.getloadavg(),
               leftover_processes_ended=leftovers, final_params_path=str(out_params))
    return res


def end_leftovers(memory: MemorySampler, grace_s: float = 10.0) -> list[str]:
    """After a child exited: wait for its cluster's processes to go, then end those still there, by pid."""
    deadline = time.monotonic() + grace_s
    while memory.leftovers() and time.monotonic() < deadline:
        time.sleep(0.2)
    ended = []
    for proc in memory.leftovers():
        try:
            ended.append(" ".join(proc.cmdline())[:120])
            proc.kill()
        except Exception:  # gone in between
            continue
    return ended


def summarise_apf(raw: dict) -> dict:
    rounds = raw["rounds"]
    return {
        "versions": raw["versions"],
        "t_training_start": raw["t_started"],  # server and every client actor ready; round 1 starts now
        "t_round1_end": raw["t_round_end"][0],
        "round": [r["round"] for r in rounds],
        "wall_s": [r["wall_s"] for r in rounds],
        "interval_s": [float(x) for x in np.diff([raw["t_started"]] + raw["t_round_end"])],
        "phase_s": [r["phase_s"] for r in rounds],
        "bytes_up": [r["bytes_up"] for r in rounds],
        "bytes_down": [r["bytes_down"] for r in rounds],
        "test_accuracy": [r["test_accuracy"] for r in rounds],
        "frozen_fraction": [r["frozen_fraction"] for r in rounds],
        "clients": raw["clients"],
        "client_compute_s_sum": raw["compute_s_sum"],
    }


def summarise_flower(raw: dict) -> dict:
    rounds = raw["rounds"]
    starts = [r["t_start"] for r in rounds]
    return {
        "versions": raw["versions"],
        # Round 1 is configured while the simulation engine may still be starting Ray and the
        # actor pool; training starts with the first ClientApp call.
        "t_training_start": min(rounds[0]["client_t_start"]),
        "t_round1_end": rounds[0]["t_end"],
        "round": [r["round"] for r in rounds],
        "wall_s": [r["t_end"] - r["t_start"] for r in rounds],
        "interval_s": [b - a for a, b in zip(starts, [*starts[1:], rounds[-1]["t_end"]], strict=True)],
        "bytes_up": [r["bytes_up"] for r in rounds],
        "bytes_down": [r["bytes_down"] for r in rounds],
        "aggregate_s": [r["aggregate_s"] for r in rounds],
        "test_accuracy": [r["test_accuracy"] for r in rounds],
        "clients": [r["clients"] for r in rounds],
        "client_compute_s_sum": [float(np.sum(r["compute_s"])) for r in rounds],
    }


def apf_side(spec_path: Path) -> None:
    """The apf-ray child: ``apf_ray.run.run`` on the Ray backend (a fresh local cluster), as a user runs it."""
    import platform

    import torch

    from apf_ray.callbacks import Callback
    from apf_ray.metrics import read_history
    from apf_ray.resume import load_resume_point
    from apf_ray.run import run

    spec = json.loads(spec_path.read_text())
    run_dir = Path(spec["run_dir"])
    cfg = bench_config(spec["k"], spec["rounds"], run_dir, spec["system"])
    out: dict[str, Any] = {"t_round_end": []}

    class Marks(Callback):
        def on_start(self, ctx) -> None:
            out["t_started"] = time.time()

        def on_round(self, event) -> None:
            out["t_round_end"].append(time.time())

    run(cfg, run_dir, backend="ray", callbacks=[Marks()])
    history = read_history(run_dir)
    clients = [json.loads(line) for line in (run_dir / "journal" / "clients.jsonl").read_text().splitlines()]
    bad = [c for c in clients if c["status"] != "ok"]
    if bad:
        raise RuntimeError(f"apf-ray: {len(bad)} client(s) did not report: {bad[:3]}")
    out["rounds"] = [{"round": h.round, "wall_s": h.wall_s, "phase_s": h.phase_s, "bytes_up": h.bytes_up,
                      "bytes_down": h.bytes_down, "test_accuracy": h.test_accuracy,
                      "frozen_fraction": h.frozen_fraction} for h in history]
    out["clients"] = [sorted(c["client_id"] for c in clients if c["round"] == h.round) for h in history]
    out["compute_s_sum"] = [sum(c["compute_s"] for c in clients if c["round"] == h.round) for h in history]
    np.save(spec["out_params"], load_resume_point(run_dir).server["params"])
    out["versions"] = {"ray": ray.__version__, "torch": torch.__version__, "numpy": np.__version__,
                       "python": platform.python_version()}
    Path(spec["out"]).write_text(json.dumps(out, indent=1))


# =========================================================================== summary
def _measured(run: dict, key: str, warmup: int) -> list:
    return [v for v, rd in zip(run[key], run["round"], strict=True) if rd > warmup]


def aggregate(runs: list[dict], k: int, warmup: int, client_s: np.ndarray, client_s_side_by_side: np.ndarray,
              schedule: np.ndarray) -> dict:
    """Pooled medians per system for one K, the plain-loop bounds, and the ratios between systems."""
    rounds = np.arange(1, schedule.shape[0] + 1)
    bound_per_round = client_s[schedule].sum(axis=1) / ACTORS
    bound = float(np.median(bound_per_round[rounds > warmup]))
    side_bound = float(np.median(client_s_side_by_side[schedule].sum(axis=1)[rounds > warmup] / ACTORS))
    out: dict[str, Any] = {"k": k, "lower_bound_s": bound, "lower_bound_per_round_s": bound_per_round.round(5).tolist(),
                           "side_by_side_bound_s": side_bound}
    for system in SYSTEMS:
        mine = [r for r in runs if r["system"] == system]
        wall = [w for r in mine for w in _measured(r, "wall_s", warmup)]
        s = out[system] = {
            "runs": len(mine),
            "median_round_s": float(np.median(wall)),
            "median_round_s_per_run": [float(np.median(_measured(r, "wall_s", warmup))) for r in mine],
            "median_round_interval_s": float(np.median([w for r in mine for w in _measured(r, "interval_s", warmup)])),
            "round_over_lower_bound": float(np.median(wall)) / bound,
            "round_over_side_by_side_bound": float(np.median(wall)) / side_bound,
            "median_startup_s": float(np.median([r["startup_s"] for r in mine])),
            "median_first_round_done_s": float(np.median([r["first_round_done_s"] for r in mine])),
            "peak_rss_mb": max(r["memory"]["peak_total_rss_mb"] for r in mine),
            "peak_pss_mb": max(r["memory"]["peak_total_pss_mb"] for r in mine),
            "bytes_per_round": float(np.median([u + d for r in mine
                                                for u, d in zip(r["bytes_up"], r["bytes_down"], strict=True)])),
            "final_test_accuracy": [r["test_accuracy"][-1] for r in mine],
            "median_client_compute_sum_s": float(np.median([c for r in mine
                                                            for c in _measured(r, "client_compute_s_sum", warmup)])),
        }
        if system != "flower":
            phases = [p for r in mine for p in _measured(r, "phase_s", warmup)]
            s["median_phase_s"] = {name: float(np.median([p.get(name, 0.0) for p in phases]))
                                   for name in sorted({n for p in phases for n in p})}
            s["final_frozen_fraction"] = [r["frozen_fraction"][-1] for r in mine]
    f = out["flower"]
    f["median_aggregate_s"] = float(np.median([x for r in runs if r["system"] == "flower"
                                               for x in _measured(r, "aggregate_s", warmup)]))
    for system in ("fedavg", "apf"):
        a = out[system]
        out[f"{system}_over_flower"] = {
            "round_s": a["median_round_s"] / f["median_round_s"],
            "round_interval_s": a["median_round_interval_s"] / f["median_round_interval_s"],
            "startup_s": a["median_startup_s"] / f["median_startup_s"],
            "first_round_done_s": a["median_first_round_done_s"] / f["median_first_round_done_s"],
            "peak_rss": a["peak_rss_mb"] / f["peak_rss_mb"],
            "bytes_per_round": a["bytes_per_round"] / f["bytes_per_round"],
        }
    apf, fed = out["apf"], out["fedavg"]
    out["apf_over_fedavg"] = {
        "round_s": apf["median_round_s"] / fed["median_round_s"],
        "client_compute_sum_s": apf["median_client_compute_sum_s"] / fed["median_client_compute_sum_s"],
        "bytes_per_round": apf["bytes_per_round"] / fed["bytes_per_round"],
    }
    return out


def agreement(runs: list[dict], schedule: np.ndarray) -> dict:
    """Evidence that the systems did the same work: clients per round and final models."""
    fed = [r for r in runs if r["system"] == "fedavg"]
    flower = [r for r in runs if r["system"] == "flower"]
    params = {r["tag"]: np.load(r["final_params_path"]) for r in fed + flower}
    return {
        "same_clients_every_round": all(r["clients"] == schedule.tolist() for r in runs),
        "fedavg_and_flower_final_models_bit_identical": all(
            params[a["tag"]].tobytes() == params[b["tag"]].tobytes() for a in fed for b in flower),
        "final_model_max_abs_diff": max(float(np.abs(params[a["tag"]] - params[b["tag"]]).max())
                                        for a in fed for b in flower),
        "final_test_accuracy": {s: [r["test_accuracy"][-1] for r in runs if r["system"] == s] for s in SYSTEMS},
    }


def print_table(summary: list[dict], warmup: int, rounds: int, reps: int) -> None:
    print(f"\nmedians over rounds {warmup + 1}..{rounds} of {reps} run(s) per system and K; bound = the sampled "
          f"clients' local steps in a bare torch loop (1 thread) / {ACTORS} actors")
    header = (f"{'K':>4} {'system':>14} {'round s':>8} {'bound s':>8} {'x bound':>7} {'x 2-proc':>8} {'start s':>7} "
              f"{'1st rnd s':>9} {'RSS MB':>7} {'KB/round':>9} {'final acc':>9}")
    print(header)
    print("-" * len(header))
    for row in summary:
        for system in SYSTEMS:
            s = row[system]
            print(f"{row['k']:>4} {system:>14} {s['median_round_s']:>8.3f} {row['lower_bound_s']:>8.3f} "
                  f"{s['round_over_lower_bound']:>7.2f} {s['round_over_side_by_side_bound']:>8.2f} "
                  f"{s['median_startup_s']:>7.2f} "
                  f"{s['median_first_round_done_s']:>9.2f} {s['peak_rss_mb']:>7.0f} "
                  f"{s['bytes_per_round'] / 1000:>9.1f} {s['final_test_accuracy'][0]:>9.4f}")
        for name in ("fedavg_over_flower", "apf_over_flower"):
            r = row[name]
            print(f"{row['k']:>4} {name.replace('_over_', '/'):>14} {r['round_s']:>8.2f} {'':>8} {'':>7} {'':>8} "
                  f"{r['startup_s']:>7.2f} {r['first_round_done_s']:>9.2f} {r['peak_rss']:>7.2f} "
                  f"{r['bytes_per_round']:>9.3f}")
        r = row["apf_over_fedavg"]
        print(f"{row['k']:>4} {'apf/fedavg':>14} {r['round_s']:>8.2f}   (clients' summed compute "
              f"{r['client_compute_sum_s']:.3f}, bytes {r['bytes_per_round']:.3f})")


def flower_versions(flower_python: Path) -> dict:
    code = ("import json, flwr, ray, torch, numpy; print(json.dumps({'flwr': flwr.__version__, "
            "'ray': ray.__version__, 'torch': torch.__version__, 'numpy': numpy.__version__}))")
    res = subprocess.run([str(flower_python), "-c", code], check=False, capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise SystemExit(f"the Flower Python at {flower_python} does not work; make it with "
                         f"bash bench/setup_flower_venv.sh\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)), help="comma-separated K values")
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run")
    parser.add_argument("--warmup", type=int, default=1, help="leading rounds per run not measured")
    parser.add_argument("--reps", type=int, default=2, help="runs per system and K")
    parser.add_argument("--flower-python", type=Path, default=BENCH / ".venv-flower" / "bin" / "python",
                        help="Python of the Flower virtualenv (bash bench/setup_flower_venv.sh makes it)")
    parser.add_argument("--json", type=Path, default=RESULTS / "vs_flower.json")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run files (logs, npz) in this directory")
    parser.add_argument("--apf-side", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.apf_side is not None:
        apf_side(args.apf_side)
        return
    clients = [int(c) for c in args.clients.split(",")]
    if args.rounds <= args.warmup:
        parser.error(f"--rounds ({args.rounds}) must exceed --warmup ({args.warmup})")
    if any(not 1 <= k <= NUM_CLIENTS for k in clients):
        parser.error(f"every K must be in 1..{NUM_CLIENTS}")
    if not args.flower_python.exists():
        parser.error(f"no Flower Python at {args.flower_python}: run bash bench/setup_flower_venv.sh")

    started = time.perf_counter()
    versions = flower_versions(args.flower_python)
    workdir = Path(tempfile.mkdtemp(prefix="vs-flower-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with LoadSampler() as load:
            npz = workdir / "shared.npz"
            workload = write_shared(npz, clients, args.rounds)
            check = same_arithmetic_check(npz, clients[0])
            print(f"workload: digits {IMAGE_SIZE}x{IMAGE_SIZE}, {NUM_CLIENTS} clients x {SHARDS_PER_CLIENT} label "
                  f"shards, LeNet-5 ({workload['num_params']} parameters), {LOCAL_STEPS} steps x batch {BATCH_SIZE}; "
                  f"{ACTORS} actors x {ACTOR_CPUS} CPU; K={clients}, {args.rounds} rounds, {args.reps} rep(s); "
                  f"same local arithmetic: {check['bit_identical']}", flush=True)
            masked = masked_step_cost(npz)
            print(f"masked local step (half frozen) / unmasked: {masked['masked_over_unmasked']:.3f}", flush=True)
            client_s_before = client_compute_times(npz)
            side_before = client_compute_times_side_by_side(npz)
            with np.load(npz) as z:
                schedules = {k: z[f"sample_k{k}"] for k in clients}
            runs: list[dict] = []
            turn = 0
            for k in clients:
                for rep in range(args.reps):
                    order = SYSTEMS[turn % 3:] + SYSTEMS[:turn % 3]
                    turn += 1
                    for system in order:
                        res = run_system(system, k, args.rounds, npz, workdir, args.flower_python,
                                         f"{system}-k{k}-r{rep}")
                        runs.append(res)
                        print(f"  K={k:>3} rep {rep} {system:>6}: median round "
                              f"{np.median(_measured(res, 'wall_s', args.warmup)):.3f} s, start-up "
                              f"{res['startup_s']:.1f} s, peak RSS {res['memory']['peak_total_rss_mb']:.0f} MB, "
                              f"load {res['load_average_after'][0]:.1f}", flush=True)
            client_s = (client_s_before + client_compute_times(npz)) / 2
            client_side = (side_before + client_compute_times_side_by_side(npz)) / 2
        summary = [aggregate([r for r in runs if r["k"] == k], k, args.warmup, client_s, client_side, schedules[k])
                   for k in clients]
        agree = {str(k): agreement([r for r in runs if r["k"] == k], schedules[k]) for k in clients}
        print_table(summary, args.warmup, args.rounds, args.reps)
        for k, a in agree.items():
            print(f"K={k}: same clients every round {a['same_clients_every_round']}; apf-ray FedAvg and Flower "
                  f"final models bit-identical {a['fedavg_and_flower_final_models_bit_identical']}")
        report = {
            "benchmark": "apf-ray on Ray vs Flower's Ray simulation: same workload, same clients every round",
            "command": command(), "code": code(), "date": now(), "machine": machine(), "load_average": load.report(),
            "setup": {
                "dataset": f"scikit-learn digits, bilinear 8x8 -> {IMAGE_SIZE}x{IMAGE_SIZE}, standardised, 80/20",
                "workload": workload, "num_clients": NUM_CLIENTS, "shards_per_client": SHARDS_PER_CLIENT,
                "clients_per_round": clients, "local_steps": LOCAL_STEPS, "batch_size": BATCH_SIZE, "lr": LR,
                "apf_threshold": APF_THRESHOLD, "rounds": args.rounds, "warmup_rounds": args.warmup,
                "reps": args.reps, "client_actors": ACTORS, "cpus_per_actor": ACTOR_CPUS,
                "object_store_mb": OBJECT_STORE_MB, "run_order": [r["tag"] for r in runs],
            },
            "definitions": {
                "median_round_s": "round start (sampling) to its aggregated model evaluated; apf-ray: "
                                  "RoundRecord.wall_s in the server actor; Flower: configure_train(r) entry to "
                                  "evaluate_fn(r) exit; rounds after the warm-up, pooled over repetitions",
                "median_round_interval_s": "between successive round ends as the driver sees them (apf-ray: "
                                           "adds the driver<->server call, the checkpointer and metrics writer)",
                "lower_bound_s": "the round's K sampled clients' local steps, each timed in a bare torch loop "
                                 "(1 thread, median of 3, mean of before and after all runs), summed, / 2 actors",
                "side_by_side_bound_s": "lower_bound_s with the loop timed in 2 processes at once (each timing "
                                        "every client, the 2 averaged), as the 2 client actors run",
                "round_over_side_by_side_bound": "median_round_s / side_by_side_bound_s",
                "round_over_lower_bound": "median_round_s / lower_bound_s (1.0 = local compute alone, perfectly "
                                          "parallel; evaluation and aggregation are not in the bound)",
                "startup_s": "process spawn to training starting (apf-ray: server and client actors ready; "
                             "Flower: its first ClientApp call)",
                "first_round_done_s": "process spawn to round 1's model evaluated",
                "peak_rss_mb": "peak of the summed RSS of the process tree (driver, GCS, raylet, agents, actors)",
                "bytes_per_round": "uplink + downlink of the round's K clients, each system's own count: apf-ray's "
                                   "wire buffers; Flower's message_size_mod count (np.save bytes of each tensor + "
                                   "keys + 8-byte config/metric values)",
                "median_phase_s": "apf-ray's server-side time per phase (RoundRecord.phase_s)",
                "masked_step": "apf_ray.training.train_local with APF's mask (half the scalars frozen) against "
                               "no mask, per client's 10 steps, interleaved, in this process",
            },
            "versions": {"flower_side": versions},
            "same_local_arithmetic": check,
            "masked_step": masked,
            "client_compute_s": {"median": float(np.median(client_s)), "mean": float(client_s.mean())},
            "client_compute_s_side_by_side": {"median": float(np.median(client_side)),
                                              "mean": float(client_side.mean())},
            "summary": summary, "agreement": agree,
            "runs": [{k: v for k, v in r.items() if k != "final_params_path"} for r in runs],
            "total_runtime_s": time.perf_counter() - started,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.json} ({report['total_runtime_s']:.0f} s)")
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
