"""A callback that watches parameters stabilise: the data of the paper's Figs. 1–3 (and 7).

The run's journal holds per-round totals; the paper's measurements need per-scalar data:

* Fig. 1 / 7: the trajectories of a few randomly sampled scalars, round by round;
* Fig. 2: the mean *effective perturbation* P = |E| / A over the scalars judged in a round;
* Fig. 3: per layer, the round at which each scalar first became stable (P < T) or frozen,
  summarised as the median and the 5th / 95th percentiles.

It reads the server where the round engine runs (:meth:`RunView.query`: the sampled
scalars of the global model) and, for strategies with an APF controller (``apf``,
``partial_sync``, ``permanent``), the controller's own E, A, period and countdown at the
sampled positions (:meth:`APFController.state_at`). For strategies without one (FedAvg — the
setting of the paper's Figs. 1–3) it keeps its own EMAs over the same sample with the
controller's formula (SPEC §2, one check per round).

Cheap by design: it follows at most ``per_layer`` scalars of every layer (a seeded sample),
never copies the whole vector, and appends one JSON line per round to ``probe/rounds.jsonl``.
Its state is callback state (``state_dict``), saved in the run's every checkpoint, so a
resumed run continues it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apf_ray.callbacks import Callback, RunView, outcome
from apf_ray.records import RoundEvent

if TYPE_CHECKING:
    from apf_ray.server import ServerCore

PROBE_DIR = "probe"
_STATE_ARRAYS = ("ref", "ema", "abs_ema", "first_stable", "first_frozen", "judged_next")


def _read_sample(server: ServerCore, index: np.ndarray) -> dict[str, Any]:
    """Where the engine runs: the sampled scalars' values and, with an APF controller, its state there."""
    out: dict[str, Any] = {"values": server.params[index]}  # fancy indexing: copies
    controller = getattr(server.strategy, "controller", None)
    if controller is not None:
        out["controller"] = {**controller.state_at(index), "num_checks": controller.num_checks,
                             "threshold": controller.threshold, "alpha": controller.alpha}
    return out


def _percentiles(rounds: np.ndarray) -> dict[str, float | None]:
    """Median and 5th / 95th percentiles of the rounds ≥ 1 (scalars that never did are left out)."""
    done = rounds[rounds > 0]
    if done.size == 0:
        return {"median": None, "p5": None, "p95": None, "fraction": 0.0}
    p5, median, p95 = np.percentile(done, [5, 50, 95])
    return {"median": float(median), "p5": float(p5), "p95": float(p95),
            "fraction": float(done.size / rounds.size)}


class StabilityProbe(Callback):
    """Follows a seeded sample of scalars through a run.

    ``per_layer``: scalars sampled per layer (all of a smaller layer); ``trajectories``: how
    many of them have their value recorded every round; ``threshold``: T for judging
    stability where the strategy has no controller (with one, the controller's current T is
    used); ``alpha``: the EMA factor of that own tracker.
    """

    state_key = "stability_probe"

    def __init__(self, *, per_layer: int = 2000, trajectories: int = 6, threshold: float = 0.05,
                 alpha: float = 0.99, seed: int = 0) -> None:
        if per_layer < 1 or trajectories < 0:
            raise ValueError(f"per_layer ({per_layer}) must be ≥ 1 and trajectories ({trajectories}) ≥ 0")
        self.per_layer, self.num_trajectories = per_layer, trajectories
        self.threshold, self.alpha, self.seed = float(threshold), float(alpha), seed

    # ---- set-up -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sample, its EMAs and first-stable/frozen rounds, and the controller's check count."""
        return {"index": self.index, "checks": self.checks, "threshold": self.current_threshold,
                **{key: self.state[key] for key in _STATE_ARRAYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded = state  # applied in on_start, once the sample is drawn and can be compared

    def on_start(self, view: RunView) -> None:
        self.view = view
        self.dir = Path(view.run_dir) / PROBE_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(self.seed)
        self.layers: list[tuple[str, int, int, int]] = []  # name, layer size, start, stop in the sample
        picks = []
        for name, sl in view.layout.layer_slices().items():
            size = sl.stop - sl.start
            take = np.sort(rng.choice(size, size=min(self.per_layer, size), replace=False)) + sl.start
            self.layers.append((name, size, sum(p.size for p in picks), sum(p.size for p in picks) + take.size))
            picks.append(take)
        self.index = np.concatenate(picks).astype(np.int64)
        self.traj = np.sort(rng.choice(self.index.size, size=min(self.num_trajectories, self.index.size),
                                       replace=False))
        sample = view.query(_read_sample, self.index)
        self.controller = sample.get("controller")  # as of the start; None: the probe's own EMAs
        n = self.index.size
        self.state = {
            "ref": sample["values"].astype(np.float32),
            "ema": np.zeros(n, np.float32),
            "abs_ema": np.zeros(n, np.float32),
            "first_stable": np.zeros(n, np.int32),  # round of the first stable verdict; 0 = not yet
            "first_frozen": np.zeros(n, np.int32),  # round after which it was first frozen; 0 = not yet
            "judged_next": np.ones(n, bool),  # active in the coming round, so judged at its check
        }
        self.checks = self.controller["num_checks"] if self.controller is not None else 0
        self.current_threshold = self.controller["threshold"] if self.controller is not None else self.threshold
        journal = self.dir / "rounds.jsonl"
        if view.start_round:
            self._restore(getattr(self, "_loaded", None))
            rows = [line for line in journal.read_text().splitlines() if json.loads(line)["round"] <= view.start_round]
            journal.write_text("".join(f"{line}\n" for line in rows))
        else:
            journal.write_text("")
        self._journal = journal.open("a")

    def _restore(self, saved: dict[str, Any] | None) -> None:
        if saved is None or not np.array_equal(saved["index"], self.index):
            raise ValueError("the checkpoint's probe state follows another sample (per_layer or seed changed): "
                             "start the run again")
        for key in _STATE_ARRAYS:
            self.state[key] = np.array(saved[key])
        self.checks = int(saved["checks"])
        self.current_threshold = float(saved["threshold"])

    # ---- every round ------------------------------------------------------------------------
    def on_round(self, event: RoundEvent) -> None:
        r = event.record.round
        s = self.state
        sample = self.view.query(_read_sample, self.index)
        w = sample["values"]
        judged = s["judged_next"]
        if self.controller is not None:
            st = sample["controller"]
            ema, abs_ema, frozen = st["ema"], st["abs_ema"], st["remaining"] > 0
            checked = st["num_checks"] != self.checks
            self.checks = st["num_checks"]
            threshold = self.current_threshold  # T of this check, before any tightening it caused
            self.current_threshold = st["threshold"]
        else:  # no controller: the same EMAs, one check per round, nothing frozen
            delta = w - s["ref"]
            s["ema"] += np.float32(1 - self.alpha) * (delta - s["ema"])
            s["abs_ema"] += np.float32(1 - self.alpha) * (np.abs(delta) - s["abs_ema"])
            s["ref"] = w.copy()
            ema, abs_ema, frozen = s["ema"], s["abs_ema"], np.zeros(w.size, bool)
            checked, threshold = True, self.threshold
        with np.errstate(invalid="ignore", divide="ignore"):
            p = np.where(abs_ema > 0, np.abs(ema) / abs_ema, 0.0)
        judged = judged & checked
        stable = judged & (p < threshold)
        s["first_stable"][(s["first_stable"] == 0) & stable] = r
        s["first_frozen"][(s["first_frozen"] == 0) & frozen] = r
        s["judged_next"] = ~frozen
        row: dict[str, Any] = {
            "round": r,
            "accuracy": event.record.test_accuracy,
            "p_mean": float(p[judged].mean()) if judged.any() else None,
            "p_median": float(np.median(p[judged])) if judged.any() else None,
            "judged": int(judged.sum()),
            "stable_fraction": float(stable.sum() / judged.sum()) if judged.any() else None,
            "frozen_fraction": float(frozen.mean()),
            "threshold": float(threshold),
            "values": [float(v) for v in w[self.traj]],
            "frozen": [bool(f) for f in frozen[self.traj]],
        }
        self._journal.write(json.dumps(row, allow_nan=False) + "\n")
        self._journal.flush()

    # ---- the end ----------------------------------------------------------------------------
    def on_end(self, summary: dict[str, Any]) -> None:
        """The probe's summary; none for a run that failed or was abandoned (it resumes from its checkpoint)."""
        self._journal.close()
        if outcome(summary) in ("failed", "abandoned"):
            return
        layers = []
        for name, size, start, stop in self.layers:
            layers.append({"layer": name, "size": int(size), "sampled": stop - start,
                           "first_stable": _percentiles(self.state["first_stable"][start:stop]),
                           "first_frozen": _percentiles(self.state["first_frozen"][start:stop])})
        out = {
            "rounds": summary["rounds"],
            "source": "controller" if self.controller is not None else "probe EMAs",
            "alpha": self.controller["alpha"] if self.controller is not None else self.alpha,
            "threshold": None if self.controller is not None else self.threshold,
            "per_layer": self.per_layer,
            "seed": self.seed,
            "trajectory_index": [int(i) for i in self.index[self.traj]],
            "trajectory_layer": [next(n for n, _, a, b in self.layers if a <= t < b) for t in self.traj],
            "layers": layers,
        }
        tmp = self.dir / ".summary.json.tmp"
        tmp.write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
        tmp.replace(self.dir / "summary.json")


def read_probe(run_dir: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """(per-round rows, summary) a probe wrote into ``run_dir``, or None if it has not finished."""
    d = Path(run_dir) / PROBE_DIR
    if not (d / "summary.json").is_file():
        return None
    rows = [json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines()]
    return rows, json.loads((d / "summary.json").read_text())

