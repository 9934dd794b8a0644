"""The report's second stage: ``reproduce.json`` → the PNG plots, from that file's data alone.

Each entry of ``figures`` names its kind — ``curves`` (one panel per quantity against rounds),
``traffic`` (accuracy against bytes, and bytes to the target), and the stability probe's
``trajectories``, ``perturbation`` and ``layers`` (Figs. 1–3) — its title and the runs it
shows, whose per-round data is under ``series``. Axes: rounds; bytes in MB (10⁶); accuracy
as a fraction; frozen scalars and savings in percent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from reproduce.analysis import smoothed

DPI = 100

PANELS: dict[str, tuple[str, str]] = {
    "accuracy": ("Test accuracy (smoothed; raw faint)", "test accuracy (fraction correct)"),
    "total_mb": ("Cumulative traffic, up + down", "cumulative bytes (MB)"),
    "frozen": ("Frozen parameters", "frozen scalars (%)"),
    "threshold": ("Stability threshold T", "T (log scale)"),
    "saving": ("Saving against FedAvg so far", "cumulative bytes saved (%)"),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (0.1, 0.2, 50, 200), not powers of ten."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _round_axis(ax, xlabel: str = "round") -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, plt, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _evals(s: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    return np.array(s["eval_rounds"], dtype=np.int64), np.array(s["accuracy"], dtype=np.float64)


def curves(path: Path, fig_spec: dict[str, Any], series: dict[str, dict[str, Any]], k: int) -> None:
    """One panel per quantity, one line per run, against rounds."""
    plt = _plt()
    panels = fig_spec["panels"]
    baseline = series.get(fig_spec.get("baseline") or "")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        sub, ylabel = PANELS[panel]
        for i, (label, key) in enumerate(fig_spec["runs"]):
            s, color = series[key], f"C{i}"
            rounds = np.array(s["rounds"], dtype=np.float64)
            if panel == "accuracy":
                er, acc = _evals(s)
                ax.plot(er, acc, color=color, alpha=0.2, lw=0.8)
                ax.plot(er, smoothed(acc, k), color=color, label=label, marker="." if len(er) < 30 else None)
            elif panel == "total_mb":
                ax.plot(rounds, np.array(s["cum_bytes_total"]) / 1e6, color=color, label=label)
            elif panel == "frozen":
                ax.plot(rounds, 100 * np.array(s["frozen_fraction"]), color=color, label=label)
            elif panel == "threshold":
                if s["threshold"]:
                    ax.step(*zip(*s["threshold"], strict=True), where="post", color=color, label=label)
                    ax.set_yscale("log")
                    _plain_log_ticks(ax.yaxis)
            elif panel == "saving" and baseline is not None:
                n = min(len(s["rounds"]), len(baseline["rounds"]))
                mine = np.array(s["cum_bytes_total"][:n])
                base = np.array(baseline["cum_bytes_total"][:n])
                ax.plot(rounds[:n], 100 * (1 - mine / base), color=color, label=label)
        if panel == "accuracy" and fig_spec["target"] is not None:
            ax.axhline(fig_spec["target"], color="grey", ls=":", lw=1, label=f"target {fig_spec['target']:.3f}")
        ax.set_title(sub)
        ax.set_ylabel(ylabel)
        _round_axis(ax)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(fig_spec["title"])
    _save(fig, plt, path)


def traffic(path: Path, fig_spec: dict[str, Any], series: dict[str, dict[str, Any]], k: int,
            rows: list[dict[str, Any]]) -> None:
    """Accuracy against cumulative bytes (log), and the bytes each run needed to reach the target."""
    plt = _plt()
    target = fig_spec["target"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, key) in enumerate(fig_spec["runs"]):
        s = series[key]
        er, acc = _evals(s)
        total = np.array(s["cum_bytes_total"])[er - 1] / 1e6
        a.plot(total, smoothed(acc, k), color=f"C{i}", label=label)
    a.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.3f}")
    a.set_xscale("log")
    _plain_log_ticks(a.xaxis)
    a.set_xlabel("cumulative bytes, up + down (MB, log scale)")
    a.set_ylabel("test accuracy (fraction, smoothed)")
    a.set_title("Accuracy against traffic")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    reached = [r for r in rows if r["bytes_to_target"] is not None]
    b.barh([r["label"] for r in reached], [r["bytes_to_target"] / 1e6 for r in reached],
           color=[f"C{rows.index(r)}" for r in reached])
    b.set_xlabel("bytes to reach the target (MB)")
    b.set_title(f"Traffic to reach accuracy {target:.3f}")
    b.invert_yaxis()
    b.grid(alpha=0.3, axis="x")
    fig.suptitle(fig_spec["title"])
    _save(fig, plt, path)


def trajectories(path: Path, fig_spec: dict[str, Any], series: dict[str, dict[str, Any]],
                 stability: dict[str, Any]) -> None:
    """Fig. 1: the two sampled scalars that moved most under FedAvg, and the same two under APF with
    their frozen rounds shaded; test accuracy in grey on a second axis."""
    plt = _plt()
    t = stability["trajectories"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for j, (ax, (title, key), side) in enumerate(zip(axes, fig_spec["runs"], ("fedavg", "apf"), strict=True)):
        rounds = t[side]["rounds"]
        for c, (scalar, values) in enumerate(zip(t["scalars"], t[side]["values"], strict=True)):
            ax.plot(rounds, values, color=f"C{c}", label=f"scalar {scalar['index']} ({scalar['layer']})")
            if j == 1:
                for first, last in t["apf"]["frozen_spans"][c]:
                    ax.axvspan(first + 0.5, last + 1.5, color=f"C{c}", alpha=0.15, lw=0)
        ax.set_ylabel("parameter value")
        ax.set_title(title)
        _round_axis(ax)
        ax.legend(fontsize=8, loc="upper left")
        twin = ax.twinx()
        twin.plot(*_evals(series[key]), color="grey", alpha=0.5, lw=0.8)
        twin.set_ylabel("test accuracy (fraction, grey)")
    fig.suptitle(fig_spec["title"])
    _save(fig, plt, path)


def perturbation(path: Path, fig_spec: dict[str, Any], stability: dict[str, Any]) -> None:
    """Fig. 2: the mean effective perturbation P = |E|/A of the sampled scalars per round, and T."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, ((label, _), side) in enumerate(zip(fig_spec["runs"], ("fedavg", "apf"), strict=True)):
        pts = [(r, p) for r, p in stability[f"p_mean_{side}"] if p is not None]
        ax.plot(*zip(*pts, strict=True), color=f"C{i}", label=label)
    ax.axhline(fig_spec["threshold"], color="grey", ls=":", lw=1, label=f"T = {fig_spec['threshold']}")
    ax.set_ylabel("mean effective perturbation P = |E| / A")
    ax.set_title(fig_spec["title"])
    _round_axis(ax)
    ax.legend(fontsize=8)
    _save(fig, plt, path)


def layers(path: Path, fig_spec: dict[str, Any], stability: dict[str, Any]) -> None:
    """Fig. 3: per layer, the round its sampled scalars first became stable (FedAvg) or frozen (APF)."""
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.4))
    names = [entry["layer"] for entry in stability["layers_fedavg"]]
    x = np.arange(len(names))
    for i, ((label, _), side, key) in enumerate(zip(fig_spec["runs"], ("fedavg", "apf"),
                                                    ("first_stable", "first_frozen"), strict=True)):
        entries = stability[f"layers_{side}"]
        med, lo, hi = (np.array([e[key][q] if e[key][q] is not None else np.nan for e in entries])
                       for q in ("median", "p5", "p95"))
        ax.errorbar(x + (i - 0.5) * 0.25, med, yerr=[med - lo, hi - med], fmt="o", capsize=4, color=f"C{i}",
                    label=label)
    ax.set_xticks(x, names, rotation=20)
    ax.set_xlabel("layer")
    ax.set_ylabel("round (median; bars: 5th–95th percentile)")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.set_title(fig_spec["title"])
    ax.legend(fontsize=8)
    _save(fig, plt, path)


def draw_figures(data: dict[str, Any], out: Path) -> list[str]:
    """Every figure ``data`` (``reproduce.json``'s content) lists, as PNGs in ``out``; their file names."""
    series, experiments = data["series"], data["experiments"]
    for file, fig_spec in data["figures"].items():
        path = Path(out) / file
        k = data["workloads"][fig_spec["model"]]["smoothing_evals"] if "model" in fig_spec else 1
        kind = fig_spec["kind"]
        if kind == "curves":
            curves(path, fig_spec, series, k)
        elif kind == "traffic":
            owner = next(e for e in experiments.values() if file in e.get("figures", []))
            traffic(path, fig_spec, series, k, owner["rows"])
        elif kind == "trajectories":
            trajectories(path, fig_spec, series, experiments["stability"])
        elif kind == "perturbation":
            perturbation(path, fig_spec, experiments["stability"])
        elif kind == "layers":
            layers(path, fig_spec, experiments["stability"])
        else:
            raise ValueError(f"{file}: unknown figure kind {kind!r}")
    return list(data["figures"])
