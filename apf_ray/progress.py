"""The terminal progress display of a run: a callback drawing one bar with the latest numbers.

It fits an 80-column terminal without cutting a number: the label is shortened to
:data:`LABEL_WIDTH` characters, the bar is narrow, the round counter and the elapsed time
never shrink, and the status keeps only what changes per round (accuracy, frozen fraction,
cumulative uplink; the clients that reported only when some did not) and is the one column
that wraps, onto a second line, when a terminal is narrower still.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column

from apf_ray.callbacks import Callback, RunContext
from apf_ray.records import ClientRecord, RoundEvent, RoundRecord

LABEL_WIDTH = 13  # characters; "digits-lenet5" fits whole
BAR_WIDTH = 9  # characters


def round_status(rec: RoundRecord) -> str:
    """``acc 0.912 · frozen 41% · up 12.3 MB`` (+ ``· 9/10 reported`` when clients dropped).

    Accuracy is ``—`` in rounds without evaluation; uplink is cumulative, in MB (10⁶ bytes).
    A round that was not aggregated says why: ``no quorum`` or ``discarded``.
    """
    acc = "—" if rec.test_accuracy is None else f"{rec.test_accuracy:.3f}"
    status = f"acc {acc} · frozen {rec.frozen_fraction:.0%} · up {rec.cum_bytes_up / 1e6:.1f} MB"
    if rec.clients_reported < rec.clients_sampled:
        status += f" · {rec.clients_reported}/{rec.clients_sampled} reported"
    if not rec.quorum_met:
        status += " · no quorum"
    elif not rec.aggregated:
        status += " · discarded"
    return status


def short_label(label: str, width: int = LABEL_WIDTH) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def round_events(rec: RoundRecord, clients: list[ClientRecord]) -> list[str]:
    """One line per thing that went wrong in a round: quorum, discarded aggregate, rejected, dropped."""
    lines = []
    if not rec.quorum_met:
        lines.append(f"round {rec.round}: quorum missed ({rec.clients_reported} of {rec.clients_sampled} "
                     "reported a valid upload); model kept")
    elif not rec.aggregated:
        lines.append(f"round {rec.round}: aggregate not finite; round discarded, model kept")
    rejected = [c for c in clients if c.status == "rejected"]
    if rejected:
        first = rejected[0]
        more = f" (and {len(rejected) - 1} more)" if len(rejected) > 1 else ""
        lines.append(f"round {rec.round}: {len(rejected)} upload(s) rejected — client {first.client_id}: "
                     f"{first.error}{more}")
    if rec.clients_dropped:
        lines.append(f"round {rec.round}: {rec.clients_dropped} client(s) dropped")
    return lines


class ProgressDisplay(Callback):
    """A rich progress bar per run; pool events and dropped clients are printed above it."""

    def __init__(self, console: Console, label: str) -> None:
        self.console = console
        self.label = short_label(label)
        self.progress: Progress | None = None

    def on_start(self, ctx: RunContext) -> None:
        # Only the status may wrap (onto a second line in a narrow terminal); the other columns
        # keep their width, so rich never cuts a round counter or a time to "10…".
        fixed = {"no_wrap": True}
        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}", table_column=Column(min_width=len(self.label), **fixed)),
            BarColumn(bar_width=BAR_WIDTH, table_column=Column(**fixed)),
            MofNCompleteColumn(table_column=Column(**fixed)),
            TimeElapsedColumn(table_column=Column(**fixed)),
            TextColumn("{task.fields[status]}", table_column=Column(no_wrap=False)),
            console=self.console, transient=False)
        self.progress.start()
        pools = ctx.info.get("pools")
        status = "started" if not pools else ", ".join(f"{n}: {len(m)} actor(s)" for n, m in pools.items())
        self.task = self.progress.add_task("run", total=ctx.cfg.train.rounds, completed=ctx.start_round,
                                           label=self.label, status=status)

    def on_round(self, event: RoundEvent) -> None:
        rec = event.record
        for e in event.pool_events:
            self.progress.console.print(f"[yellow]round {rec.round}: {e}")
        for line in round_events(rec, event.clients):
            self.progress.console.print(f"[yellow]{escape(line)}", highlight=False)
        self.progress.update(self.task, completed=rec.round, status=round_status(rec))

    def on_end(self, summary: dict[str, Any]) -> None:
        self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
