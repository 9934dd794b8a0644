"""Run outputs: TensorBoard scalars, a per-round journal, Parquet tables, summary.json, plots.

The round loop only hands records to :class:`MetricsWriter` (a callback); everything a user
looks at afterwards is derived here. The journal (``journal/rounds.jsonl`` and
``journal/clients.jsonl``, one JSON line per record, flushed every round) is the durable
record: appending costs O(1) per round, so long runs never rewrite their history. On resume
the journal is cut back to the checkpoint's round; the Parquet tables are written from it
when the run ends or stops.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from apf_ray.callbacks import Callback, RunContext, outcome
from apf_ray.derived import best_accuracy, final_accuracy
from apf_ray.outputs import record
from apf_ray.records import PHASES, ClientRecord, RoundEvent, RoundRecord

JOURNAL = "journal"
TABLES = ("rounds", "clients", "layers")


def _read_journal(path: Path, upto_round: int) -> list[dict[str, Any]]:
    """Rows of a JSON-lines journal with ``round <= upto_round``; a torn last line is dropped."""
    rows = []
    if not path.is_file():
        return rows
    with path.open() as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a crash mid-write leaves at most one partial line, at the end
            if row["round"] <= upto_round:
                rows.append(row)
    return rows


def _rewrite_journal(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
    tmp.replace(path)


def tensorboard_scalars(rec: RoundRecord) -> dict[str, float]:
    """The per-round scalars shown in TensorBoard (rounds without evaluation omit accuracy)."""
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
        "clients/rejected": rec.clients_rejected,
        "clients/discarded": rec.clients_discarded,
        "clients/quorum_met": int(rec.quorum_met),
        "time/wall_s": rec.wall_s,
        "time/simulated_s": rec.simulated_s,
        "time/simulated_cumulative_s": rec.cum_simulated_s,
    }
    scalars.update({f"frozen_by_layer/{layer}": frac for layer, frac in rec.layer_frozen.items()})
    scalars.update({f"time_by_phase/{phase}_s": secs for phase, secs in rec.phase_s.items()})
    return {k: float(v) for k, v in scalars.items() if v is not None}


def wait_until_new_event_files_sort_last(board: Path) -> None:
    """Wait until a new TensorBoard event file will sort after those in ``board`` (at most ~1 s).

    TensorBoard reads a folder's event files in name order, and a file's name starts with the
    second it was created, then the host, the process id and a per-process counter. A run
    resumed within the same second by the same process (a notebook, a test) would otherwise
    get a name that can sort *before* the earlier file (counter 10 < 9 as text), and
    TensorBoard would apply the earlier file's events last, undoing the purge of redone rounds.
    """
    stamps = [int(p.name.split(".")[3]) for p in board.glob("events.out.tfevents.*")
              if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    while stamps and int(time.time()) <= max(stamps):
        time.sleep(0.05)


class MetricsWriter(Callback):
    """TensorBoard events and the journal per round; tables, summary and plots at the end."""

    def __init__(self) -> None:
        self.history: list[RoundRecord] = []
        self.tb = None

    def on_start(self, ctx: RunContext) -> None:
        self.cfg, self.run_dir = ctx.cfg, ctx.run_dir
        journal = self.run_dir / JOURNAL
        record(self.run_dir, JOURNAL, *(f"{JOURNAL}/{name}.jsonl" for name in ("rounds", "clients")),
               *(f"{name}.parquet" for name in TABLES), "summary.json", "curves.png")
        journal.mkdir(parents=True, exist_ok=True)
        self._files = {}
        for name in ("rounds", "clients"):
            path = journal / f"{name}.jsonl"
            rows = _read_journal(path, ctx.start_round)
            _rewrite_journal(path, rows)  # drops rounds done after the checkpoint we resume from
            if name == "rounds":
                self.history = [RoundRecord(**row) for row in rows]
            self._files[name] = path.open("a")
        if ctx.cfg.output.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            board = self.run_dir / "tensorboard"
            if ctx.start_round:
                wait_until_new_event_files_sort_last(board)
            earlier = set(board.glob("events.out.tfevents.*"))
            # purge_step drops events of rounds redone after a resume
            self.tb = SummaryWriter(str(board), purge_step=ctx.start_round + 1 if ctx.start_round else None)
            opened = set(board.glob("events.out.tfevents.*")) - earlier
            record(self.run_dir, "tensorboard", *(p.relative_to(self.run_dir) for p in opened))

    def on_round(self, event: RoundEvent) -> None:
        """Append the round to the journal and TensorBoard, timing this work into its ``phase_s``.

        The round's own journal line is written last, so it can carry the time spent on
        everything else (one append of a few hundred bytes is all it leaves out).
        """
        start = time.perf_counter()
        rec = event.record
        self.history.append(rec)
        self._append("clients", [asdict(c) for c in event.clients])
        if self.tb is not None:
            self._tensorboard(event)
        rec.phase_s["metrics"] = time.perf_counter() - start
        self._append("rounds", [asdict(rec)])

    def _tensorboard(self, event: RoundEvent) -> None:
        rec = event.record
        for tag, value in tensorboard_scalars(rec).items():
            self.tb.add_scalar(tag, value, rec.round)
        if self.cfg.output.per_client_tensorboard:
            for c in event.clients:
                self.tb.add_scalar(f"client/{c.client_id}/bytes_up", c.bytes_up, rec.round)
                self.tb.add_scalar(f"client/{c.client_id}/compute_s", c.compute_s, rec.round)
                if c.train_loss is not None:
                    self.tb.add_scalar(f"client/{c.client_id}/train_loss", c.train_loss, rec.round)
        self.tb.flush()

    def _append(self, name: str, rows: list[dict[str, Any]]) -> None:
        f = self._files[name]
        f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        f.flush()

    def on_end(self, summary: dict[str, Any]) -> None:
        """Tables, summary.json and plots of a run that finished or stopped; a run that failed or
        was abandoned keeps its journal only (its tables are read from it, :func:`journal_tables`)."""
        self.close()
        if outcome(summary) in ("failed", "abandoned"):
            return
        write_tables(self.run_dir)
        write_json(self.run_dir / "summary.json", summary)
        if self.cfg.output.plots and self.history:
            plot_history(self.run_dir / "curves.png", {self.cfg.strategy.name: self.history},
                         title=run_title(self.run_dir, self.cfg.name, self.cfg.strategy.name))

    def close(self) -> None:
        for f in getattr(self, "_files", {}).values():
            f.close()
        self._files = {}
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def journal_tables(run_dir: Path) -> dict[str, pa.Table]:
    """The ``rounds``, ``clients`` and ``layers`` tables of a run, from its journal.

    Works on a finished run and on one still running or stopped (the journal is appended every
    round). Every table has its columns even when it has no rows. A round's ``phase_s`` becomes
    the columns ``phase_<name>_s`` (null where the phase did not happen, or in journals written
    before rounds were timed by phase).
    """
    journal = Path(run_dir) / JOURNAL
    rounds = _read_journal(journal / "rounds.jsonl", math.inf)
    clients = _read_journal(journal / "clients.jsonl", math.inf)
    layers = [{"round": r["round"], "layer": name, "frozen_fraction": f}
              for r in rounds for name, f in r["layer_frozen"].items()]
    rounds = [{**{k: v for k, v in r.items() if k not in _NESTED},
               **{f"phase_{p}_s": r.get("phase_s", {}).get(p) for p in PHASES}} for r in rounds]
    layer_schema = pa.schema([("round", pa.int64()), ("layer", pa.string()), ("frozen_fraction", pa.float64())])
    return {"rounds": pa.Table.from_pylist(rounds, schema=_schema(RoundRecord)),
            "clients": pa.Table.from_pylist(clients, schema=_schema(ClientRecord)),
            "layers": pa.Table.from_pylist(layers, schema=layer_schema)}


def read_journal(run_dir: Path, name: str = "rounds") -> list[dict[str, Any]]:
    """The run's ``rounds`` or ``clients`` journal as rows (a missing journal is empty; a torn last line dropped)."""
    return _read_journal(Path(run_dir) / JOURNAL / f"{name}.jsonl", math.inf)


def read_history(run_dir: Path) -> list[RoundRecord]:
    """The run's round records, from its journal (what the plots are drawn from)."""
    return [RoundRecord(**row) for row in read_journal(run_dir)]


def write_tables(run_dir: Path) -> None:
    """``rounds.parquet``, ``clients.parquet`` and ``layers.parquet`` from the journal."""
    for name, table in journal_tables(run_dir).items():
        if not table.num_rows:
            continue
        tmp = Path(run_dir) / f".{name}.parquet.tmp"
        pq.write_table(table, tmp)
        tmp.replace(Path(run_dir) / f"{name}.parquet")


_NESTED = ("layer_frozen", "phase_s")
"""RoundRecord fields that are mappings: their own table (layers) or flattened columns (phases)."""


def _schema(record: type) -> pa.Schema:
    """Column types from a record's annotations, so all-None columns keep their type."""
    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "float | None": pa.float64(),
             "ClientStatus": pa.string(), "bool": pa.bool_()}
    fields = [(name, types[str(ann)]) for name, ann in record.__annotations__.items() if name not in _NESTED]
    if record is RoundRecord:
        fields += [(f"phase_{p}_s", pa.float64()) for p in PHASES]
    return pa.schema(fields)


def summarize(cfg_dict: dict[str, Any], history: list[RoundRecord]) -> dict[str, Any]:
    """The run's headline numbers; wall time is the sum of round times (start-up excluded).

    Strict JSON: a value that does not exist (no evaluation yet, no threshold) is None.
    """
    last = history[-1] if history else None
    return {
        "final_accuracy": final_accuracy(history),
        "best_accuracy": best_accuracy(history),
        "rounds": len(history),
        "bytes_up": last.cum_bytes_up if last else 0,
        "bytes_down": last.cum_bytes_down if last else 0,
        "wall_time_s": sum(h.wall_s for h in history),
        "simulated_time_s": last.cum_simulated_s if last else 0.0,
        "mean_round_simulated_s": (last.cum_simulated_s / len(history)) if last else 0.0,
        "frozen_fraction_final": last.frozen_fraction if last else 0.0,
        "threshold_final": last.threshold if last else None,
        "clients_dropped": int(sum(h.clients_dropped for h in history)),
        "clients_rejected": int(sum(h.clients_rejected for h in history)),
        "rounds_not_aggregated": int(sum(not h.aggregated for h in history)),
        "config": cfg_dict,
    }


def write_json(path: Path, data: Any) -> Path:
    """Strict JSON (NaN or infinity is an error, never written), atomically replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def run_title(run_dir: Path, workload: str, strategy: str) -> str:
    """``quickstart: digits-lenet5, apf`` — the run folder, then what ran in it."""
    return f"{Path(run_dir).resolve().name}: {workload}, {strategy}"


def history_figure(series: dict[str, Iterable[RoundRecord]], title: str):
    """A matplotlib figure: test accuracy, cumulative uplink (MB) and frozen scalars (%) per round.

    One line per run in ``series``; rounds are integers on every x axis, each y axis names its
    unit, and ``title`` names the run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, hist in series.items():
        hist = list(hist)
        rounds = [h.round for h in hist]
        acc = [(h.round, h.test_accuracy) for h in hist if h.test_accuracy is not None]
        if acc:
            axes[0].plot(*zip(*acc, strict=True), label=label, marker="." if len(acc) < 30 else None)
        axes[1].plot(rounds, [h.cum_bytes_up / 1e6 for h in hist], label=label)
        axes[2].plot(rounds, [100 * h.frozen_fraction for h in hist], label=label)
    ylabels = ("test accuracy (fraction correct)", "cumulative uplink (MB)", "frozen scalars (%)")
    titles = ("Accuracy", "Uplink traffic", "Frozen parameters")
    for ax, ylabel, sub in zip(axes, ylabels, titles, strict=True):
        ax.set_title(sub)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_history(path: Path, series: dict[str, Iterable[RoundRecord]], title: str) -> Path:
    """Write :func:`history_figure` to ``path`` (PNG, 110 dpi, its contents in the metadata)."""
    return save_figure(history_figure(series, title), path)


def figure_contents(fig: Any) -> dict[str, Any]:
    """What a matplotlib figure draws, as plain data: its title, and per panel its title, axis
    labels and each labelled series (a line or scatter in the legend) with its number of points.

    :func:`save_figure` writes this into the PNG, so a reader (or a test) can tell what a plot
    shows without comparing pixels.
    """
    def points(artist: Any) -> int:
        return len(artist.get_xdata()) if hasattr(artist, "get_xdata") else len(artist.get_offsets())

    panels = []
    for ax in fig.axes:
        handles, labels = ax.get_legend_handles_labels()
        panels.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                       "series": {label: points(h) for h, label in zip(handles, labels, strict=True)}})
    return {"title": fig.get_suptitle(), "panels": panels}


PNG_CONTENTS_KEY = "Description"
"""The PNG text chunk that holds :func:`figure_contents` (JSON) in every plot this package saves."""


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """``fig`` as a PNG at ``path`` (``dpi`` dots per inch) with :func:`figure_contents` in its
    metadata (:data:`PNG_CONTENTS_KEY`), then closed."""
    import matplotlib.pyplot as plt

    contents = figure_contents(fig)
    metadata = {PNG_CONTENTS_KEY: json.dumps(contents), **({"Title": contents["title"]} if contents["title"] else {})}
    fig.savefig(path, dpi=dpi, metadata=metadata)
    plt.close(fig)
    return Path(path)
