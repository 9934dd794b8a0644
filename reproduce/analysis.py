"""Numbers from finished run folders: what the report's tables and plots show.

Everything is read back from the files a run wrote (journal, summary, the worker's and the
probe's files), never from memory, so a report can be rebuilt at any time from the output
folder. Units: bytes (MB = 10⁶ bytes in tables), seconds, accuracy as a fraction, frozen
fractions in [0, 1], rounds as integers.

Accuracy on these non-IID splits jumps from round to round, so comparisons use a *smoothed*
accuracy: the mean of the last ``k`` evaluations (``k`` per workload, stated in the report).
"Bytes to reach a target" is the cumulative uplink + downlink at the first evaluation whose
smoothed accuracy reaches the target (a fraction of FedAvg's final smoothed accuracy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apf_ray import derived
from apf_ray.derived import saving
from apf_ray.derived import smoothed_accuracy as smoothed
from apf_ray.metrics import read_journal
from apf_ray.records import RoundRecord
from apf_ray.stability_probe import read_probe
from reproduce.plan import RunSpec
from reproduce.runner import is_done, run_dir
from reproduce.worker import WORKER_FILE


@dataclass
class RunData:
    """One finished run, read from its folder."""

    spec: RunSpec
    rounds: list[dict[str, Any]]  # journal rows, one per round
    clients: list[dict[str, Any]]  # journal rows, one per sampled client per round
    summary: dict[str, Any]
    worker: dict[str, Any]
    probe: tuple[list[dict[str, Any]], dict[str, Any]] | None

    def evals(self) -> tuple[np.ndarray, np.ndarray]:
        """(rounds, accuracy) of the rounds that were evaluated."""
        pts = [(r["round"], r["test_accuracy"]) for r in self.rounds if r["test_accuracy"] is not None]
        return np.array([p[0] for p in pts], dtype=np.int64), np.array([p[1] for p in pts], dtype=np.float64)

    def column(self, name: str) -> np.ndarray:
        return np.array([r[name] for r in self.rounds], dtype=np.float64)


def load_run(out: Path, spec: RunSpec) -> RunData | None:
    """The run's data, or None if it is not done (in this output folder, for this config)."""
    if not is_done(out, spec):
        return None
    d = run_dir(out, spec.key)
    return RunData(spec, read_journal(d), read_journal(d, "clients"),
                   json.loads((d / "summary.json").read_text()), json.loads((d / WORKER_FILE).read_text()),
                   read_probe(d) if spec.probe else None)


def bytes_to_target(rd: RunData, target: float, k: int) -> dict[str, Any] | None:
    """The first evaluated round whose smoothed accuracy ≥ ``target``, and the bytes spent by then."""
    hit = derived.bytes_to_target([RoundRecord(**row) for row in rd.rounds], target, k)
    return None if hit is None else {"round": hit.round, "bytes_total": hit.bytes_total, "bytes_up": hit.bytes_up}


def frozen_rise(rd: RunData, window: int) -> float:
    """Points (fraction) by which the frozen fraction rose over the last ``window`` rounds."""
    frozen = rd.column("frozen_fraction")
    if frozen.size <= window:
        return float(frozen[-1] - frozen[0]) if frozen.size else 0.0
    return float(frozen[-1] - frozen[-1 - window])


def transfer_s_per_round(rd: RunData) -> float:
    """Mean over rounds of the slowest reporting client's transfer time alone (download + upload).

    The network model's round time adds each client's *measured* compute, which on a shared
    machine depends on the load; this part depends only on the bytes, so it is reproducible.
    """
    from apf_ray.network import transfer_s

    links = {p["name"]: p["network"] for p in rd.spec.config["cluster"]["pools"]}
    per_round: dict[int, float] = {}
    for c in rd.clients:
        if c["status"] not in ("ok", "skipped"):
            continue
        link = links[c["pool"]]
        t = (transfer_s(c["bytes_down"], link["down_mbps"], link["latency_ms"])
             + transfer_s(c["bytes_up"], link["up_mbps"], link["latency_ms"]))
        per_round[c["round"]] = max(per_round.get(c["round"], 0.0), t)
    return float(np.mean(list(per_round.values()))) if per_round else 0.0


def metrics(rd: RunData, k: int) -> dict[str, Any]:
    """The headline numbers of one run."""
    _, acc = rd.evals()
    last = rd.rounds[-1]
    ok = [c["compute_s"] for c in rd.clients if c["status"] == "ok"]
    thresholds = [r["threshold"] for r in rd.rounds if r["threshold"] is not None]
    tightened = [r["round"] for prev, r in zip(rd.rounds, rd.rounds[1:], strict=False)
                 if r["threshold"] is not None and prev["threshold"] is not None and r["threshold"] < prev["threshold"]]
    return {
        "rounds": int(last["round"]),
        "accuracy_final": float(acc[-1]),
        "accuracy_best": float(acc.max()),
        "accuracy_smoothed": float(smoothed(acc, k)[-1]),
        "smoothing_evals": k,
        "bytes_up": int(last["cum_bytes_up"]),
        "bytes_down": int(last["cum_bytes_down"]),
        "bytes_total": int(last["cum_bytes_up"] + last["cum_bytes_down"]),
        "frozen_final": float(last["frozen_fraction"]),
        "frozen_mean": float(rd.column("frozen_fraction").mean()),
        "frozen_rise_last_third": frozen_rise(rd, max(1, len(rd.rounds) // 3)),
        "threshold_final": thresholds[-1] if thresholds else None,
        "tightened_at_rounds": tightened,
        "wall_s_per_round": float(rd.column("wall_s").mean()),
        "simulated_s_per_round": float(rd.column("simulated_s").mean()),
        "transfer_s_per_round": transfer_s_per_round(rd),
        "client_compute_s": float(np.mean(ok)) if ok else None,
        "run_wall_s": float(rd.column("wall_s").sum()),
        "clients_dropped": int(sum(r["clients_dropped"] for r in rd.rounds)),
        "peak_rss_bytes": rd.worker.get("peak_rss_bytes"),
        "load_mean_1min": (rd.worker.get("load_average") or {}).get("mean_1min_during"),
        "controller": rd.worker.get("controller_timing"),
    }


def window_saving(rd: RunData, base: RunData, start: int, stop: int) -> float | None:
    """Total-bytes saving over rounds ``start+1 … stop`` only (the stationary phase of a long run)."""
    if len(rd.rounds) < stop or len(base.rounds) < stop:
        return None

    def spent(x: RunData) -> int:
        a, b = x.rounds[stop - 1], x.rounds[start - 1] if start else None
        total = a["cum_bytes_up"] + a["cum_bytes_down"]
        return total - (b["cum_bytes_up"] + b["cum_bytes_down"] if b else 0)

    return saving(spent(rd), spent(base))
