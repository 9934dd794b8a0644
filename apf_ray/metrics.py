"""Run outputs: TensorBoard scalars, Parquet tables, summary.json and plots.

The round loop only hands records to :class:`MetricsWriter`; everything a user looks at
afterwards is derived here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from apf_ray.federation import ClientRecord, RoundRecord


class MetricsWriter:
    """Writes one round at a time; ``purge_step`` drops TensorBoard events of rounds redone on resume."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = True, per_client: bool = False,
                 purge_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.per_client = per_client
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def write_round(self, rec: RoundRecord, clients: list[ClientRecord]) -> None:
        if self.tb is None:
            return
        r = rec.round
        scalars = {
            "accuracy/test": rec.test_accuracy,
            "loss/test": rec.test_loss,
            "loss/train": rec.train_loss,
            "bytes/up": rec.bytes_up,
            "bytes/down": rec.bytes_down,
            "bytes/up_cumulative": rec.cum_bytes_up,
            "bytes/down_cumulative": rec.cum_bytes_down,
            "apf/frozen_fraction": rec.frozen_fraction,
            "apf/threshold": rec.threshold,
            "clients/sampled": rec.clients_sampled,
            "clients/reporting": rec.clients_reported,
            "clients/dropped": rec.clients_dropped,
            "time/wall_s": rec.wall_s,
            "time/simulated_s": rec.simulated_s,
            "time/simulated_cumulative_s": rec.cum_simulated_s,
        }
        for tag, value in scalars.items():
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.tb.add_scalar(tag, value, r)
        for layer, frac in rec.layer_frozen.items():
            self.tb.add_scalar(f"frozen_by_layer/{layer}", frac, r)
        if self.per_client:
            for c in clients:
                self.tb.add_scalar(f"client/{c.client_id}/bytes_up", c.bytes_up, r)
                self.tb.add_scalar(f"client/{c.client_id}/compute_s", c.compute_s, r)
                if not math.isnan(c.train_loss):
                    self.tb.add_scalar(f"client/{c.client_id}/train_loss", c.train_loss, r)
        self.tb.flush()

    def write_tables(self, history: list[RoundRecord], clients: list[ClientRecord]) -> None:
        """Rewrite the Parquet tables from the full history (atomic replace)."""
        rounds = [{k: v for k, v in asdict(h).items() if k != "layer_frozen"} for h in history]
        layers = [{"round": h.round, "layer": name, "frozen_fraction": f}
                  for h in history for name, f in h.layer_frozen.items()]
        for name, rows in (("rounds", rounds), ("clients", [asdict(c) for c in clients]), ("layers", layers)):
            if not rows:
                continue
            tmp = self.run_dir / f".{name}.parquet.tmp"
            pq.write_table(pa.Table.from_pylist(rows), tmp)
            tmp.replace(self.run_dir / f"{name}.parquet")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def summarize(cfg_dump: dict[str, Any], history: list[RoundRecord]) -> dict[str, Any]:
    """The run's headline numbers; wall time is the sum of round times (cluster start-up excluded)."""
    accs = _finite([h.test_accuracy for h in history])
    last = history[-1] if history else None
    return {
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "rounds": len(history),
        "bytes_up": last.cum_bytes_up if last else 0,
        "bytes_down": last.cum_bytes_down if last else 0,
        "wall_time_s": sum(h.wall_s for h in history),
        "simulated_time_s": last.cum_simulated_s if last else 0.0,
        "mean_round_simulated_s": float(np.mean([h.simulated_s for h in history])) if history else 0.0,
        "frozen_fraction_final": last.frozen_fraction if last else 0.0,
        "threshold_final": last.threshold if last else None,
        "clients_dropped": int(sum(h.clients_dropped for h in history)),
        "config": cfg_dump,
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = Path(run_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=float, allow_nan=True))
    return path


def plot_history(run_dir: Path, series: dict[str, list[RoundRecord]], filename: str = "curves.png") -> Path:
    """Accuracy, cumulative uplink bytes and frozen fraction per round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, hist in series.items():
        rounds = [h.round for h in hist]
        acc = [(h.round, h.test_accuracy) for h in hist if not math.isnan(h.test_accuracy)]
        if acc:
            axes[0].plot(*zip(*acc), label=label)
        axes[1].plot(rounds, [h.cum_bytes_up / 1e6 for h in hist], label=label)
        axes[2].plot(rounds, [h.frozen_fraction for h in hist], label=label)
    for ax, title in zip(axes, ("test accuracy", "cumulative uplink (MB)", "frozen fraction")):
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    path = Path(run_dir) / filename
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
