"""How the server scales: 100 → 10,000 virtual clients, 10 → 1,000 clients per round, two model sizes.

Every combination is a real run on one local Ray cluster (2 client actors of 1 CPU, the server
actor on 0 CPUs) of APF on Fashion-MNIST (60,000 training images, IID, so 10,000 clients hold
6 each) with 1 local step of batch 4 per client — so that the server's side of a round, not
training, is what grows. Per round it reads the server's own phase timings (``RoundRecord.
phase_s``: sampling, download accounting, clients, decode, aggregation, controller,
evaluation, record, checkpoint, metrics) from the run's journal; a background sampler records
the peak RSS of every process of the cluster and the object store's use.

The server's work per round — every phase but ``clients`` (training and transfers),
``evaluation`` (a fixed test set) and ``metrics`` — is also given in *model-vector copies*:
its seconds divided by the time this process takes to copy the model's float32 vector once.
Decoding, validating and accumulating K uploads is about 3K copies and the controller a few,
so a server that stays within ``3K + 30`` copies does no work that grows faster than the round.

One more row runs APF with a Top-k (10%) sparsifier after it: each client then keeps an
error-feedback residual (a model-sized float32 vector) between its rounds, so 10,000 virtual
clients of ResNet-18 hold ~450 GB of state over a long run; the client store keeps it on disk
(``apf_ray.client_store``) and the row shows what the driver and each actor hold meanwhile.
The goals of the issue this table answers are checked at the end (:func:`goals`): the server
actor's peak at K = 1,000 within 1.5x of its peak at K = 10, server work at ResNet-18, K = 10
within 3K + 30 copies, and the Top-k row with the driver and every actor under 4 GB.

Combinations that cannot fit this machine are skipped and recorded as such. APF aggregates on the
way in (``apf_ray.edge``): each client actor sums its clients' uploads into one float64 partial
(8 B per parameter, and a float64 term while it adds one), so a round's uploads
take one partial per actor in the object store and the server merges them into one more, whatever
K is (ResNet-18: ~0.5 GB with 2 actors); a combination runs when that fits beside the cluster
itself in the memory available when the benchmark starts.

    python3 bench/scale.py [--rounds 5] [--only lenet5:10000:1000 resnet18:10000:100:topk ...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

# isort: split
import psutil  # bundled with Ray: importable once ray is imported (ray/thirdparty_files)
from orchestration import MemorySampler  # bench/orchestration.py: peak memory of the cluster's processes
from provenance import RESULTS, LoadSampler, code, command, machine, now

from actors.backend import ray_session
from apf_ray.callbacks import Callback, RunContext
from apf_ray.config import ExperimentConfig, build_config
from apf_ray.data import load_dataset
from apf_ray.metrics import read_journal
from apf_ray.records import PHASES
from apf_ray.run import run

MODELS = ("lenet5", "resnet18")
NUM_CLIENTS = (100, 1_000, 10_000)
PER_ROUND = (10, 100, 1_000)
UPLINKS = {"apf": [], "topk": [{"name": "topk", "ratio": 0.1}]}
"""Each row's uplink chain after APF, by the name ``--only`` uses as a combination's fourth field."""
STATEFUL_ROWS = (("resnet18", 10_000, 100, "topk"),)
"""Rows with per-client state (Top-k's residual) beside the APF grid."""
SERVER_RSS_RATIO = 1.5
"""Goal: the server actor's peak RSS at K = 1,000 within this factor of its peak at K = 10."""
ACTOR_RSS_LIMIT_MB = 4e9 / 2**20
"""Goal: the driver and every actor of a stateful row under 4 GB (in MiB, as the sampler reports)."""
NUM_PARAMS = {"lenet5": 61_706, "resnet18": 11_172_810}
"""Parameters of each model on Fashion-MNIST (checked against the run's own count in :func:`measure`)."""
CLUSTER_GB = 6.0
"""Peak RSS of the cluster (driver, Ray's processes, server and 2 client actors) with ResNet-18 at K = 10."""
SERVER_WORK = ("sampling", "downlink", "decode", "aggregation", "controller", "record", "checkpoint")
"""Phases whose cost is the server's own per-round work on model vectors (model-copy units)."""
ACTORS = 2
OBJECT_STORE_MB = 3072
"""The object store's size when a round's partials fit in it; larger models get what they need."""
TEST_IMAGES = 200
MB = 2**20


PARTIAL_BYTES_PER_PARAM = 16
"""A partial while it grows: float64 sums (8 B a parameter) and the float64 term being added
(``apf_ray.aggregation.Partial.add``, ``merge``)."""


def partials_gb(model: str) -> float:
    """GB a round's partials take: one per actor in the object store, and the server's merged one."""
    return (ACTORS + 1) * PARTIAL_BYTES_PER_PARAM * NUM_PARAMS[model] / 1e9


def skip_reason(model: str, available_gb: float) -> str | None:
    """Why ``model`` cannot run here, or None when it fits; at any number of uploads per round, since
    they are summed where they are trained."""
    need = partials_gb(model)
    if need + CLUSTER_GB <= available_gb:
        return None
    return (f"{model} needs ~{need:.1f} GB for a round's {ACTORS + 1} partials (object store + server) beside "
            f"the cluster's ~{CLUSTER_GB:.0f} GB; {available_gb:.0f} GB of memory was available")


def scale_config(model: str, num_clients: int, k: int, rounds: int, run_dir: Path,
                 object_store_mb: int = OBJECT_STORE_MB, uplink: str = "apf") -> ExperimentConfig:
    """APF (then ``UPLINKS[uplink]``), IID Fashion-MNIST, 1 local step of batch 4; checkpoint every round,
    evaluate once at the end."""
    return build_config({
        "name": f"scale-{model}-{num_clients}-{k}-{uplink}",
        "seed": 0,
        "data": {"dataset": "fashion_mnist", "options": {"limit_test": TEST_IMAGES}, "partitioner": "iid",
                 "num_clients": num_clients},
        "model": {"name": model},
        "train": {"rounds": rounds, "clients_per_round": k, "local_steps": 1, "batch_size": 4, "lr": 0.01,
                  "eval_every": rounds},
        "strategy": {"name": "apf", "options": {"threshold": 0.2}, "uplink": UPLINKS[uplink]},
        "cluster": {"pools": [{"name": "cpu", "num_actors": ACTORS, "num_cpus": 1}], "round_timeout_s": 900,
                    "object_store_mb": object_store_mb},
        "output": {"dir": str(run_dir), "checkpoint_every": 1, "keep_checkpoints": 2, "tensorboard": False,
                   "plots": False},
    }, source="bench/scale.py")


def copy_seconds(num_params: int, repeat: int = 30) -> float:
    """Median seconds to copy a float32 vector of ``num_params`` into another (the model-copy unit)."""
    src, dst = np.ones(num_params, np.float32), np.empty(num_params, np.float32)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


class StartInfo(Callback):
    """The backend's start-up report (its ``num_params``)."""

    def on_start(self, ctx: RunContext) -> None:
        self.info = ctx.info


def measure(model: str, num_clients: int, k: int, uplink: str, rounds: int, dataset: Any,
            dataset_ref: ray.ObjectRef, gcs: str, workdir: Path) -> dict:
    """One run; per-phase medians over rounds 2.. (round 1 sends every client the full model)."""
    run_dir = workdir / f"{model}-{num_clients}-{k}-{uplink}"
    cfg = scale_config(model, num_clients, k, rounds, run_dir, uplink=uplink)
    load_before = os.getloadavg()
    started = time.perf_counter()
    start_info = StartInfo()
    with MemorySampler(tree=True, gcs_address=gcs) as memory:
        summary = run(cfg, run_dir, backend="ray", backend_options={"dataset_ref": dataset_ref}, dataset=dataset,
                      callbacks=[start_info])
    rows = read_journal(run_dir)
    measured = rows[1:]
    state_bytes = sum(f.stat().st_size for f in (run_dir / "client_state").rglob("*") if f.is_file())
    shutil.rmtree(run_dir)  # a Top-k row's client state is GBs; the next row needs the disk
    num_params = int(start_info.info["num_params"])
    if num_params != NUM_PARAMS[model]:
        raise SystemExit(f"{model} has {num_params} parameters, NUM_PARAMS says {NUM_PARAMS[model]}: update it")
    unit = copy_seconds(num_params)
    phase = {p: [r["phase_s"].get(p) for r in measured] for p in PHASES}
    median = {p: float(np.median([x for x in v if x is not None])) for p, v in phase.items()
              if any(x is not None for x in v)}
    work = [sum(r["phase_s"].get(p, 0.0) for p in SERVER_WORK) for r in measured]
    mem = memory.report()
    return {
        "model": model, "num_clients": num_clients, "clients_per_round": k, "uplink": uplink, "rounds": rounds,
        "num_params": num_params,
        "wall_s_per_round": [round(r["wall_s"], 4) for r in rows],
        "median_wall_s": float(np.median([r["wall_s"] for r in measured])),
        "phase_s_per_round": {p: [None if x is None else round(x, 5) for x in v] for p, v in phase.items()},
        "median_phase_s": median,
        "server_work_s_per_round": [round(w, 5) for w in work],
        "median_server_work_s": float(np.median(work)),
        "model_copy_s": unit,
        "server_work_copies": float(np.median(work)) / unit,
        "bytes_down_per_round": [r["bytes_down"] for r in rows],
        "clients_dropped": sum(r["clients_dropped"] for r in rows),
        "final_accuracy": summary["final_accuracy"],
        "run_s": time.perf_counter() - started,
        "client_state_mb_on_disk": round(state_bytes / MB, 1),
        "memory": mem,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }


ROW_KEYS = ("model", "num_clients", "clients_per_round", "uplink")
"""The fields of a row that name its combination, in the order of :func:`combinations`' tuples."""


def row_key(r: dict) -> tuple[str, int, int, str]:
    """(model, N, K, uplink): a row's combination, as ``combos`` and ``--only`` hold it."""
    return tuple(r[k] for k in ROW_KEYS)


def row_name(r: dict) -> str:
    """``model:N:K`` (and ``:uplink`` for a stateful row), as ``--only`` takes it."""
    *combination, uplink = map(str, row_key(r))
    return ":".join(combination if uplink == "apf" else [*combination, uplink])


def print_table(rows: list[dict]) -> None:
    cols = ("sampling", "downlink", "clients", "decode", "aggregation", "controller", "record", "checkpoint",
            "metrics")
    header = (f"{'row':>24} {'round s':>8} " + " ".join(f"{c[:8]:>8}" for c in cols)
              + f" {'copies':>7} {'3K+30':>6} {'RSS MB':>7} {'server MB':>9} {'actor MB':>8} {'store MiB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skipped" in r:
            print(f"{row_name(r):>24}  skipped: {r['skipped']}")
            continue
        m = r["memory"]
        print(f"{row_name(r):>24} {r['median_wall_s']:>8.3f} "
              + " ".join(f"{r['median_phase_s'].get(c, 0.0):>8.4f}" for c in cols)
              + f" {r['server_work_copies']:>7.0f} {3 * r['clients_per_round'] + 30:>6} "
              f"{m['peak_total_rss_mb']:>7.0f} {max(m['server_actor_peak_rss_mb'], default=0):>9.0f} "
              f"{max(m['client_actor_peak_rss_mb'], default=0):>8.0f} {m['object_store_peak_mib'] or 0:>9}")


def goals(rows: list[dict]) -> list[dict]:
    """The table's goals, each with what was measured and whether it is met (rows not run are left out)."""
    ran = {row_key(r): r for r in rows if "skipped" not in r}
    out = []
    for (model, n, k, uplink), r in sorted(ran.items()):
        base = ran.get((model, n, PER_ROUND[0], uplink))
        if uplink == "apf" and k == PER_ROUND[-1] and base is not None:
            peak, base_peak = (max(x["memory"]["server_actor_peak_rss_mb"]) for x in (r, base))
            out.append({"goal": f"server actor peak RSS at K = {k:,} within {SERVER_RSS_RATIO}x of K = "
                                f"{PER_ROUND[0]}", "row": row_name(r), "measured": round(peak / base_peak, 3),
                        "limit": SERVER_RSS_RATIO, "met": peak <= SERVER_RSS_RATIO * base_peak})
        if uplink == "apf" and model == "resnet18" and k == PER_ROUND[0]:
            out.append({"goal": "server work within 3K + 30 model copies, a checkpoint every round",
                        "row": row_name(r), "measured": round(r["server_work_copies"]), "limit": 3 * k + 30,
                        "met": r["server_work_copies"] <= 3 * k + 30})
        if uplink != "apf":
            m = r["memory"]
            biggest = max([m["driver_peak_rss_mb"], *m["server_actor_peak_rss_mb"], *m["client_actor_peak_rss_mb"]])
            out.append({"goal": "driver and every actor under 4 GB RSS", "row": row_name(r),
                        "measured": biggest, "limit": round(ACTOR_RSS_LIMIT_MB, 1),
                        "met": biggest < ACTOR_RSS_LIMIT_MB})
    return out


def print_goals(checked: list[dict]) -> None:
    """One line per goal of :func:`goals`: met or not, and what was measured against its limit."""
    for g in checked:
        print(f"{'met' if g['met'] else 'NOT met'}: {g['goal']} ({g['row']}: {g['measured']}, limit {g['limit']})")


def parse_only(specs: list[str], parser: argparse.ArgumentParser) -> set[tuple]:
    """``model:N:K[:uplink]`` strings as combinations (uplink ``apf`` when left out)."""
    wanted = set()
    for spec in specs:
        parts = spec.split(":")
        if len(parts) == 3:
            parts.append("apf")
        if (len(parts) != 4 or parts[0] not in MODELS or not parts[1].isdigit() or not parts[2].isdigit()
                or not 0 < int(parts[2]) <= int(parts[1]) or parts[3] not in UPLINKS):
            parser.error(f"--only {spec}: expected MODEL:N:K or MODEL:N:K:UPLINK with MODEL one of "
                         f"{', '.join(MODELS)}, 0 < K <= N and UPLINK one of {', '.join(UPLINKS)}")
        wanted.add((parts[0], int(parts[1]), int(parts[2]), parts[3]))
    return wanted


def combinations(wanted: set[tuple] | None = None) -> list[tuple[str, int, int, str]]:
    """The table's rows as ``(model, N, K, uplink)`` in its order, or only ``wanted`` (from :func:`parse_only`:
    the table's own in its order, then any others)."""
    combos = [(m, n, k, "apf") for m in MODELS for n in NUM_CLIENTS for k in PER_ROUND if k <= n]
    combos += list(STATEFUL_ROWS)
    if wanted is None:
        return combos
    return [c for c in combos if c in wanted] + sorted(wanted - set(combos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (round 1 is not in the medians)")
    parser.add_argument("--only", nargs="*", default=None, metavar="MODEL:N:K[:UPLINK]",
                        help="run only these combinations, e.g. lenet5:10000:1000 resnet18:10000:100:topk")
    parser.add_argument("--json", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is not measured)")
    combos = combinations(parse_only(args.only, parser) if args.only else None)

    started = time.perf_counter()
    rows: list[dict] = []
    available_gb = psutil.virtual_memory().available / 1e9
    skipped = {m: why for m, *_ in combos if (why := skip_reason(m, available_gb))}
    store_mb = max([OBJECT_STORE_MB] + [int(partials_gb(m) * 1e9 / MB * 1.25) + 1
                                        for m, *_ in combos if m not in skipped])
    with LoadSampler() as load, tempfile.TemporaryDirectory(prefix="apf-scale-") as tmp:
        session_cfg = scale_config(MODELS[0], NUM_CLIENTS[0], PER_ROUND[0], args.rounds, Path(tmp), store_mb)
        dataset = load_dataset(session_cfg.data.dataset, **session_cfg.data.options)
        with ray_session(session_cfg):
            gcs = ray.get_runtime_context().gcs_address
            dataset_ref = ray.put(dataset)  # one object-store copy shared by every run
            for model, n, k, uplink in combos:
                if model in skipped:
                    rows.append({"model": model, "num_clients": n, "clients_per_round": k, "uplink": uplink,
                                 "skipped": skipped[model]})
                    continue
                print(f"{model}: {n} clients, {k} per round, uplink {uplink} ...", flush=True)
                rows.append(measure(model, n, k, uplink, args.rounds, dataset, dataset_ref, gcs, Path(tmp)))
                r = rows[-1]
                print(f"  round {r['median_wall_s']:.3f} s, server work {r['median_server_work_s']:.4f} s "
                      f"= {r['server_work_copies']:.0f} model copies (3K+30 = {3 * k + 30}), "
                      f"downlink {r['median_phase_s']['downlink']:.4f} s, run {r['run_s']:.0f} s", flush=True)
    print_table(rows)
    checked = goals(rows)
    print_goals(checked)
    report = {"command": command(), "code": code(), "date": now(), "machine": machine(), "load_average": load.report(),
              "benchmark": "server scaling with virtual clients and clients per round",
              "total_s": time.perf_counter() - started, "rows": rows, "goals": checked}
    args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
