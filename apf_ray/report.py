"""Human-readable outputs: the summary table of a run and the side-by-side table of ``compare``.

Both fit an 80-column terminal without cutting a number: numbers never wrap, headers are
two short lines, and only text (a variant's name, a run directory) folds onto more lines.
Units: MB are 10⁶ bytes, times are seconds, savings are relative to the first variant.
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.table import Table

from apf_ray.derived import saving


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.2f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.1f}%"


def _acc(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def summary_table(summary: dict[str, Any], title: str = "run summary") -> Table:
    t = Table(title=title, show_header=False)
    t.add_column("metric", style="bold", no_wrap=True)
    t.add_column("value", justify="right", overflow="fold")
    rows = [
        ("rounds", str(summary["rounds"])),
        ("final accuracy", _acc(summary["final_accuracy"])),
        ("best accuracy", _acc(summary["best_accuracy"])),
        ("uplink (MB)", _mb(summary["bytes_up"])),
        ("downlink (MB)", _mb(summary["bytes_down"])),
        ("frozen fraction (final)", _pct(summary["frozen_fraction_final"])),
        ("clients dropped", str(summary["clients_dropped"])),
        ("uploads rejected", str(summary.get("clients_rejected", 0))),
        ("rounds not aggregated", str(summary.get("rounds_not_aggregated", 0))),
        ("simulated time (s)", f"{summary['simulated_time_s']:.1f}"),
        ("wall time (s)", f"{summary['wall_time_s']:.1f}"),
        ("run directory", summary.get("run_dir", "")),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def comparison_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Side-by-side numbers; savings (:func:`apf_ray.derived.saving`) are relative to the first variant."""
    base = next(iter(results.values()))
    return [
        {
            "variant": label,
            "final_accuracy": s["final_accuracy"],
            "best_accuracy": s["best_accuracy"],
            "bytes_up": s["bytes_up"],
            "bytes_down": s["bytes_down"],
            "uplink_saving": saving(s["bytes_up"], base["bytes_up"]),
            "total_saving": saving(s["bytes_up"] + s["bytes_down"], base["bytes_up"] + base["bytes_down"]),
            "simulated_time_s": s["simulated_time_s"],
            "time_saving": saving(s["simulated_time_s"], base["simulated_time_s"]),
            "frozen_fraction_final": s["frozen_fraction_final"],
            "rounds": s["rounds"],
        }
        for label, s in results.items()
    ]


COMPARISON_HEADERS = ("variant", "final\nacc", "best\nacc", "up\nMB", "down\nMB", "up\nsaving", "total\nsaving",
                      "sim\ntime s", "time\nsaving", "\nfrozen")


def comparison_table(rows: list[dict[str, Any]], title: str) -> Table:
    t = Table(title=title, box=box.SIMPLE_HEAD, padding=0, show_edge=False)  # the box puts one space between columns
    t.add_column(COMPARISON_HEADERS[0], overflow="fold", min_width=8)
    for col in COMPARISON_HEADERS[1:]:
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(r["variant"], _acc(r["final_accuracy"]), _acc(r["best_accuracy"]), _mb(r["bytes_up"]),
                  _mb(r["bytes_down"]), _pct(r["uplink_saving"]), _pct(r["total_saving"]),
                  f"{r['simulated_time_s']:.1f}", _pct(r["time_saving"]), _pct(r["frozen_fraction_final"]))
    return t
