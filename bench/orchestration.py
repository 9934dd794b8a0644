"""Benchmark the Ray layer's orchestration overhead: round wall time vs. local compute, and peak memory.

For each clients-per-round value K: a LeNet-5 run on digits (K clients, IID, every client
sampled every round, APF) on ONE local Ray cluster started by this script, then the same
config in the in-process reference loop. Round 1 is warm-up and is not reported. Per round:

    serial compute  = sum of the clients' compute_s (timed inside the actors around training)
    ideal parallel  = serial compute / number of client actors
    overhead ratio  = round wall time / ideal parallel   (1.0 = no orchestration cost)

Round wall time is ``RoundRecord.wall_s``: the whole round as timed by ``FederatedRun.step``
(sampling, dispatch, training, aggregation, APF controller, evaluation). A background thread
samples the memory of the driver and of every process of the cluster it started (its process
tree: GCS, raylet, agents, server and client actors): RSS at 10 Hz, PSS and the object store
at 1 Hz. RSS counts shared pages (torch libraries, the object store) once per process; PSS
splits them, so its total is the memory the run really holds.

    python3 bench/orchestration.py [--clients 10,50,100] [--rounds N] [--local-steps S]
                                   [--actors A] [--json PATH] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import ray
import torch

# isort: split
import psutil  # bundled with Ray: importable once ray is imported (ray/thirdparty_files)
from provenance import RESULTS, LoadSampler, command, now

from actors import ray_private
from actors.backend import ray_session
from apf_ray.callbacks import Callback
from apf_ray.config import ConfigError, ExperimentConfig, build_config
from apf_ray.metrics import read_journal
from apf_ray.run import run

DEFAULT_CLIENTS = (10, 50, 100)
WARMUP_ROUNDS = 1
MB = 2**20
SAMPLE_INTERVAL_S = 0.1  # RSS sampling period (10 Hz)
SLOW_EVERY = 10  # PSS and object-store readings cost ~10 ms each: every 10th sample (1 Hz)
ACTOR_KINDS = ("client_actor", "server_actor")
PLASMA_USAGE = re.compile(r"Plasma memory usage (\d+) MiB")


def bench_config(clients: int, rounds: int, local_steps: int, actors: int, cpus_per_actor: float,
                 run_dir: Path, overrides: list[str]) -> ExperimentConfig:
    """LeNet-5 on digits, ``clients`` IID clients all sampled every round, no outputs but the checkpoint."""
    raw = {
        "name": f"orchestration-{clients}",
        "seed": 0,
        "data": {"dataset": "digits", "partitioner": "iid", "num_clients": clients},
        "model": {"name": "lenet5"},
        "train": {"rounds": rounds, "clients_per_round": clients, "local_steps": local_steps,
                  "batch_size": 32, "lr": 0.05},
        "strategy": {"name": "apf"},
        "cluster": {"pools": [{"name": "cpu", "num_actors": actors, "num_cpus": cpus_per_actor}],
                    "round_timeout_s": 600},
        # checkpoint_every=0: no periodic checkpoints (the final one is still written); the
        # per-client compute times are read back from the run's journal.
        "output": {"dir": str(run_dir), "checkpoint_every": 0, "tensorboard": False, "plots": False},
    }
    return build_config(raw, overrides, source="bench/orchestration.py")


def process_kind(proc: psutil.Process, driver_pid: int) -> str:
    """Role of a process of this session, from the title Ray gives its workers (``ray::Class.method``)."""
    if proc.pid == driver_pid:
        return "driver"
    title = (proc.cmdline() or [""])[0]
    if title.startswith(("ray::ClientPoolActor", "ray::ClientAppActor")):  # apf-ray's, Flower's
        return "client_actor"
    if title.startswith("ray::ServerActor"):
        return "server_actor"
    if title.startswith("ray::IDLE"):
        return "idle_worker"
    return "ray_system"  # gcs_server, raylet, dashboard/runtime-env agents, monitor, log monitor


class MemorySampler:
    """Peak memory of this process, or of ``root`` (a pid), and with ``tree`` all its descendants.

    Totals are peaks of the per-sample sum (not sums of per-process peaks). Units: bytes inside,
    MB (2**20) in :meth:`report`. Every process seen is remembered, so :meth:`leftovers` can
    name those of a child's cluster still running after the child exited.
    """

    def __init__(self, tree: bool, gcs_address: str | None = None, root: int | None = None) -> None:
        self.tree = tree
        self.gcs_address = gcs_address
        self.me = psutil.Process(root)
        self.seen: dict[int, psutil.Process] = {}
        self.samples = 0
        self.peak_rss = self.peak_pss = 0
        self.peak_kind_rss: dict[str, int] = {}
        self.pid_kind: dict[int, str] = {}
        self.pid_rss: dict[int, int] = {}
        self.pid_pss: dict[int, int] = {}
        self.store_mib: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self._sample(slow=self.samples % SLOW_EVERY == 0)
            if self._stop.wait(SAMPLE_INTERVAL_S):
                self._sample(slow=True)  # the state at the end of the block
                return

    def _sample(self, slow: bool) -> None:
        try:
            procs = [self.me] + (self.me.children(recursive=True) if self.tree else [])
        except psutil.Error:  # the root exited
            return
        for proc in procs:
            self.seen.setdefault(proc.pid, proc)
        total_rss = total_pss = 0
        kind_rss: dict[str, int] = {}
        for proc in procs:
            try:
                kind = process_kind(proc, self.me.pid)
                rss = proc.memory_info().rss
                pss = proc.memory_full_info().pss if slow else 0
            except psutil.Error:  # the process ended between listing and reading
                continue
            # An idle worker may become an actor; an actor's title is gone once it exits (a zombie
            # has no cmdline), so an actor stays an actor.
            if self.pid_kind.get(proc.pid) not in ACTOR_KINDS:
                self.pid_kind[proc.pid] = kind
            self.pid_rss[proc.pid] = max(self.pid_rss.get(proc.pid, 0), rss)
            total_rss += rss
            kind_rss[kind] = kind_rss.get(kind, 0) + rss
            if slow:
                self.pid_pss[proc.pid] = max(self.pid_pss.get(proc.pid, 0), pss)
                total_pss += pss
        self.peak_rss = max(self.peak_rss, total_rss)
        self.peak_pss = max(self.peak_pss, total_pss)
        for kind, value in kind_rss.items():
            self.peak_kind_rss[kind] = max(self.peak_kind_rss.get(kind, 0), value)
        if slow and self.gcs_address:
            match = PLASMA_USAGE.search(ray_private.object_store_summary(self.gcs_address))
            if match:
                self.store_mib = max(self.store_mib or 0, int(match.group(1)))
        self.samples += 1

    def leftovers(self) -> list[psutil.Process]:
        """Processes seen in the tree that still run (``is_running`` also rules out a reused pid)."""
        return [p for pid, p in self.seen.items() if pid != self.me.pid and p.is_running()]

    def peaks_of(self, kind: str) -> tuple[list[float], list[float]]:
        """Per-process peak (RSS MB, PSS MB) of every process of ``kind``, by pid."""
        pids = sorted(pid for pid, k in self.pid_kind.items() if k == kind)
        return ([round(self.pid_rss[p] / MB, 1) for p in pids],
                [round(self.pid_pss.get(p, 0) / MB, 1) for p in pids])

    def report(self) -> dict:
        client_rss, client_pss = self.peaks_of("client_actor")
        server_rss, server_pss = self.peaks_of("server_actor")
        driver_rss, driver_pss = self.peaks_of("driver")
        idle_rss, _ = self.peaks_of("idle_worker")
        return {
            "peak_total_rss_mb": round(self.peak_rss / MB, 1),
            "peak_total_pss_mb": round(self.peak_pss / MB, 1),
            "peak_rss_mb_by_kind": {k: round(v / MB, 1) for k, v in sorted(self.peak_kind_rss.items())},
            "driver_peak_rss_mb": driver_rss[0], "driver_peak_pss_mb": driver_pss[0],
            "server_actor_peak_rss_mb": server_rss, "server_actor_peak_pss_mb": server_pss,
            "client_actor_peak_rss_mb": client_rss, "client_actor_peak_pss_mb": client_pss,
            "idle_worker_peak_rss_mb": idle_rss,
            "object_store_peak_mib": self.store_mib,
            "samples": self.samples,
        }


class Marks(Callback):
    """Driver clock when the backend is up and after each round's event arrived; pool events."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.events: list[str] = []

    def on_start(self, ctx) -> None:
        self.times.append(time.perf_counter())

    def on_round(self, event) -> None:
        self.times.append(time.perf_counter())
        self.events.extend(event.pool_events)


def per_round_compute(client_history: list[dict], rounds: int) -> np.ndarray:
    """Sum of compute_s of the clients that trained, indexed by round (index 0 unused)."""
    rnd = np.array([c["round"] for c in client_history], dtype=np.int64)
    secs = np.array([c["compute_s"] for c in client_history], dtype=np.float64)
    trained = np.isin([c["status"] for c in client_history], ("ok", "skipped"))
    return np.bincount(rnd[trained], weights=secs[trained], minlength=rounds + 1)


def round_stats(run_dir: Path, actors: int) -> dict:
    """Wall vs. compute time of the measured rounds of a finished run (from its journal)."""
    all_rounds = read_journal(run_dir, "rounds")
    history = [h for h in all_rounds if h["round"] > WARMUP_ROUNDS]
    compute = per_round_compute(read_journal(run_dir, "clients"), len(all_rounds))
    rounds = np.array([h["round"] for h in history])
    wall = np.array([h["wall_s"] for h in history])
    serial = compute[rounds]
    ideal = serial / actors
    return {
        "rounds": rounds.tolist(),
        "wall_s": wall.round(4).tolist(),
        "serial_compute_s": serial.round(4).tolist(),
        "median_wall_s": float(np.median(wall)),
        "median_serial_compute_s": float(np.median(serial)),
        "median_ideal_parallel_s": float(np.median(ideal)),
        "median_wall_over_ideal": float(np.median(wall / ideal)),
        "median_wall_over_serial": float(np.median(wall / serial)),
        "median_non_compute_s": float(np.median(wall - ideal)),
        "clients_dropped": int(sum(h["clients_dropped"] for h in history)),
        "final_test_accuracy": float(all_rounds[-1]["test_accuracy"]),
    }


def bench_clients(clients: int, args: argparse.Namespace, cpus_per_actor: float, gcs_address: str,
                  workdir: Path) -> dict:
    """One Ray run and one in-process run of the same config."""
    ray_dir, local_dir = workdir / f"ray-{clients}", workdir / f"inprocess-{clients}"
    load_before = os.getloadavg()

    marks = Marks()
    started = time.perf_counter()
    cfg = bench_config(clients, args.rounds, args.local_steps, args.actors, cpus_per_actor, ray_dir, args.set)
    with MemorySampler(tree=True, gcs_address=gcs_address) as ray_memory:
        run(cfg, ray_dir, backend="ray", callbacks=[marks])
    ray_total = time.perf_counter() - started
    ray_stats = round_stats(ray_dir, args.actors)
    driver_rounds = np.diff(marks.times)[WARMUP_ROUNDS:]
    ray_stats.update(
        startup_s=marks.times[0] - started,
        total_s=ray_total,
        median_driver_round_s=float(np.median(driver_rounds)),
        pool_events=marks.events,
        memory=ray_memory.report(),
    )

    started = time.perf_counter()
    cfg = bench_config(clients, args.rounds, args.local_steps, args.actors, cpus_per_actor, local_dir, args.set)
    with MemorySampler(tree=False) as local_memory:
        run(cfg, local_dir)
    local_stats = round_stats(local_dir, actors=1)
    local_stats.update(total_s=time.perf_counter() - started, memory=local_memory.report())

    return {
        "clients_per_round": clients,
        "ray": ray_stats,
        "inprocess": local_stats,
        "inprocess_over_ray_wall": local_stats["median_wall_s"] / ray_stats["median_wall_s"],
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


def print_table(rows: list[dict], actors: int) -> None:
    header = (f"{'clients':>7} {'wall s':>7} {'serial s':>8} {'ideal s':>7} {'wall/ideal':>10} "
              f"{'wall/serial':>11} {'drv rnd s':>9} {'inproc s':>8} {'inproc/ser':>10} {'speedup':>7} "
              f"{'RSS MB':>7} {'PSS MB':>7} {'actor MB':>8} {'server MB':>9} {'store MiB':>9}")
    print(f"\nRay: {actors} client actors; medians over rounds {WARMUP_ROUNDS + 1}.. "
          "(wall/serial/ideal: Ray run; inproc: in-process reference loop; speedup = inproc wall / Ray wall)")
    print(header)
    print("-" * len(header))
    for row in rows:
        r, loc, mem = row["ray"], row["inprocess"], row["ray"]["memory"]
        actor_mb = max(mem["client_actor_peak_rss_mb"], default=float("nan"))
        server_mb = max(mem["server_actor_peak_rss_mb"], default=float("nan"))
        store = mem["object_store_peak_mib"]
        print(f"{row['clients_per_round']:>7} {r['median_wall_s']:>7.3f} {r['median_serial_compute_s']:>8.3f} "
              f"{r['median_ideal_parallel_s']:>7.3f} {r['median_wall_over_ideal']:>10.2f} "
              f"{r['median_wall_over_serial']:>11.2f} {r['median_driver_round_s']:>9.3f} "
              f"{loc['median_wall_s']:>8.3f} {loc['median_wall_over_serial']:>10.2f} "
              f"{row['inprocess_over_ray_wall']:>7.2f} {mem['peak_total_rss_mb']:>7.0f} "
              f"{mem['peak_total_pss_mb']:>7.0f} {actor_mb:>8.0f} {server_mb:>9.0f} "
              f"{'-' if store is None else store:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)),
                        help="comma-separated clients per round (each run has exactly that many clients)")
    parser.add_argument("--rounds", type=int, default=6, help=f"rounds per run; the first {WARMUP_ROUNDS} is warm-up")
    parser.add_argument("--local-steps", type=int, default=10, help="SGD steps per client per round")
    parser.add_argument("--actors", type=int, default=len(os.sched_getaffinity(0)),
                        help="client actors (default: one per CPU of this machine)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override applied to every run, e.g. train.batch_size=16")
    parser.add_argument("--json", type=Path, default=RESULTS / "orchestration.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.rounds <= WARMUP_ROUNDS:
        parser.error(f"--rounds must be > {WARMUP_ROUNDS} (the warm-up), got {args.rounds}")
    if args.actors < 1:
        parser.error(f"--actors must be >= 1, got {args.actors}")

    started = time.perf_counter()
    load_start = os.getloadavg()
    with LoadSampler() as load, tempfile.TemporaryDirectory(prefix="apf-orchestration-") as tmp:
        try:  # a bad --set fails here, before any Ray process starts
            session_cfg = bench_config(clients[0], args.rounds, args.local_steps, args.actors, 1.0, Path(tmp),
                                       args.set)
        except ConfigError as err:
            parser.error(str(err))
        with ray_session(session_cfg):
            cluster = ray.cluster_resources()
            # Every actor gets an equal CPU share, at most one, so any --actors fits the local cluster.
            cpus_per_actor = min(1.0, cluster["CPU"] / args.actors)
            gcs_address = ray.get_runtime_context().gcs_address
            print(f"local Ray cluster: {cluster['CPU']:g} CPUs, object store {session_cfg.cluster.object_store_mb} MB; "
                  f"{args.actors} client actors x {cpus_per_actor:g} CPU, "
                  f"{session_cfg.cluster.torch_threads} torch thread(s) each; server actor 0 CPU")
            train = session_cfg.train
            print(f"LeNet-5 on digits, IID, all clients sampled every round, {train.rounds} rounds "
                  f"({WARMUP_ROUNDS} warm-up), {train.local_steps} local steps, batch {train.batch_size}, APF; "
                  f"load average {load_start[0]:.2f}")
            rows = []
            for k in clients:
                rows.append(bench_clients(k, args, cpus_per_actor, gcs_address, Path(tmp)))
                r = rows[-1]
                print(f"  {k} clients: Ray {r['ray']['total_s']:.1f} s, in-process {r['inprocess']['total_s']:.1f} s")

    print_table(rows, args.actors)
    report = {
        "command": command(), "date": now(), "load_average": load.report(),
        "benchmark": "Ray orchestration overhead: round wall time vs. client compute time, peak memory",
        "setup": {
            "dataset": "digits", "model": "lenet5", "partitioner": "iid", "strategy": "apf",
            "rounds": train.rounds, "warmup_rounds": WARMUP_ROUNDS, "local_steps": train.local_steps,
            "batch_size": train.batch_size, "overrides": args.set, "client_actors": args.actors,
            "cpus_per_actor": cpus_per_actor, "torch_threads_per_actor": session_cfg.cluster.torch_threads,
            "ray_cluster_cpus": cluster["CPU"], "object_store_mb": session_cfg.cluster.object_store_mb,
            "memory_sampling": {"rss_hz": 1 / SAMPLE_INTERVAL_S,
                                "pss_and_store_hz": 1 / (SAMPLE_INTERVAL_S * SLOW_EVERY),
                                "processes": "driver + its process tree (the local Ray cluster)"},
        },
        "definitions": {
            "wall_s": "RoundRecord.wall_s: the whole round inside the server actor (FederatedRun.step)",
            "serial_compute_s": "sum over the round's clients of compute_s (timed around local training)",
            "ideal_parallel_s": "serial_compute_s / client_actors",
            "wall_over_ideal": "orchestration overhead ratio (1.0 = perfect parallel scaling)",
            "non_compute_s": "wall_s - ideal_parallel_s: dispatch, serialisation, aggregation, APF, evaluation",
            "driver_round_s": "driver clock between successive round records (adds the driver<->server round trip)",
            "inprocess_over_ray_wall": "in-process round wall / Ray round wall (speed-up of the Ray layer)",
        },
        "machine": {
            "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "numpy": np.__version__, "load_average_start": load_start, "load_average_end": os.getloadavg(),
            "note": "shared machine: other jobs ran during the benchmark, timings are noisy",
        },
        "total_runtime_s": time.perf_counter() - started,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json} ({report['total_runtime_s']:.0f} s)")


if __name__ == "__main__":
    main()
