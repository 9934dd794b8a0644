"""The reproduction's report: ``report.md`` (every table), PNG plots and ``reproduce.json``.

Built from the run folders under ``OUTPUT/runs/`` alone, for every experiment whose runs are
there (an experiment not run yet says how to run it), so it can be rebuilt at any time
(``apf-ray reproduce --report-only``). ``reproduce.json`` holds every number the report
shows. Units: MB = 10⁶ bytes, seconds, accuracy as a fraction, savings against FedAvg on the
same workload and number of rounds, accuracy differences in percentage points.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from reproduce.analysis import RunData, bytes_to_target, load_run, metrics, saving, smoothed, window_saving
from reproduce.plan import APF_T, MODEL_NAMES, PAPER, TARGET_FRACTION, Plan, settings_label

DPI = 100
_PAPER_ROUND = {"fedavg": "round_s_fedavg", "apf": "round_s_apf", "apf-aggressive": "round_s_aggressive"}


# ---- formatting --------------------------------------------------------------------------------

def _mb(b: float | None) -> str:
    return "—" if b is None else f"{b / 1e6:,.1f}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _pts(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}"


def _acc(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _signed_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f}%"


def _s(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ms(x: float | None) -> str:
    return "—" if x is None else (f"{x * 1e3:.2f} ms" if x < 0.1 else f"{x * 1e3:.0f} ms")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


# ---- plots -------------------------------------------------------------------------------------

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


PANELS: dict[str, tuple[str, str]] = {
    "accuracy": ("Test accuracy (smoothed; raw faint)", "test accuracy (fraction correct)"),
    "total_mb": ("Cumulative traffic, up + down", "cumulative bytes (MB)"),
    "frozen": ("Frozen parameters", "frozen scalars (%)"),
    "threshold": ("Stability threshold T", "T (log scale)"),
    "saving": ("Saving against FedAvg so far", "cumulative bytes saved (%)"),
}


def curves_figure(path: Path, title: str, series: list[tuple[str, RunData]], k: int, panels: tuple[str, ...],
                  baseline: RunData | None = None, target: float | None = None) -> Path:
    """One panel per quantity, one line per run, against rounds; written as a PNG."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        sub, ylabel = PANELS[panel]
        for i, (label, rd) in enumerate(series):
            color = f"C{i}"
            rounds = rd.column("round")
            if panel == "accuracy":
                er, acc = rd.evals()
                ax.plot(er, acc, color=color, alpha=0.2, lw=0.8)
                ax.plot(er, smoothed(acc, k), color=color, label=label, marker="." if len(er) < 30 else None)
            elif panel == "total_mb":
                total = rd.column("cum_bytes_up") + rd.column("cum_bytes_down")
                ax.plot(rounds, total / 1e6, color=color, label=label)
            elif panel == "frozen":
                ax.plot(rounds, 100 * rd.column("frozen_fraction"), color=color, label=label)
            elif panel == "threshold":
                t = [(r["round"], r["threshold"]) for r in rd.rounds if r["threshold"] is not None]
                if t:
                    ax.step(*zip(*t, strict=True), where="post", color=color, label=label)
                    ax.set_yscale("log")
                    _plain_log_ticks(ax.yaxis)
            elif panel == "saving" and baseline is not None:
                n = min(len(rd.rounds), len(baseline.rounds))
                mine = (rd.column("cum_bytes_up") + rd.column("cum_bytes_down"))[:n]
                base = (baseline.column("cum_bytes_up") + baseline.column("cum_bytes_down"))[:n]
                ax.plot(rounds[:n], 100 * (1 - mine / base), color=color, label=label)
        if panel == "accuracy" and target is not None:
            ax.axhline(target, color="grey", ls=":", lw=1, label=f"target {target:.3f}")
        ax.set_title(sub)
        ax.set_ylabel(ylabel)
        _round_axis(ax)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# ---- the report --------------------------------------------------------------------------------

STALL_FACTOR = 20.0
"""A round over this many times its run's median round (and over :data:`STALL_MIN_S`) stalled."""
STALL_MIN_S = 60.0
"""Seconds: shorter rounds never count as stalled, however fast the run's median."""


def _stalled_rounds(wall_s: np.ndarray, rounds: np.ndarray) -> list[tuple[int, float]]:
    """(round, seconds) of the rounds that stalled: the process was stopped or starved, not working."""
    median = float(np.median(wall_s))
    return [(int(r), float(w)) for r, w in zip(rounds, wall_s, strict=True)
            if w > STALL_FACTOR * median and w > STALL_MIN_S]


class Report:
    """Collects the Markdown sections, the plots and the JSON of one report."""

    def __init__(self, plan: Plan, out: Path, statuses: dict[str, str]) -> None:
        self.plan, self.out, self.statuses = plan, Path(out), statuses
        self.data: dict[str, RunData] = {}
        for key, spec in plan.runs.items():
            rd = load_run(self.out, spec)
            if rd is not None:
                self.data[key] = rd
        self.m = {key: metrics(rd, plan.workloads[rd.spec.model].smoothing) for key, rd in self.data.items()}
        self.json: dict[str, Any] = {"experiments": {}}
        self.plots: list[str] = []

    # helpers
    def k(self, model: str) -> int:
        return self.plan.workloads[model].smoothing

    def have(self, *keys: str) -> bool:
        return all(k in self.data for k in keys)

    def missing(self, name: str) -> str:
        exp = self.plan.experiments[name]
        absent = [k for k in exp.runs if k not in self.data]
        failed = [f"`{k}` ({self.statuses[k]})" for k in absent if self.statuses.get(k, "").startswith("failed")]
        text = (f"*Not run in this output folder yet* (missing: {', '.join(f'`{k}`' for k in absent)}): "
                f"`apf-ray reproduce{' --quick' if self.plan.scale == 'quick' else ''} --only {name} "
                f"--output {self.out}`.")
        return text + (f" Failed: {', '.join(failed)}." if failed else "")

    def target(self, model: str) -> float | None:
        base = self.m.get(f"{model}-fedavg")
        return None if base is None else TARGET_FRACTION * base["accuracy_smoothed"]

    def plot(self, name: str, make: Callable[[Path], Any]) -> str:
        path = self.out / name
        make(path)
        self.plots.append(name)
        return f"![{name}]({name})"

    def compare_rows(self, model: str, keys: list[str]) -> list[dict[str, Any]]:
        """Per run: accuracy, bytes and savings against the same model's FedAvg, and bytes to target."""
        base_key = f"{model}-fedavg"
        base = self.m.get(base_key)
        target = self.target(model)
        base_hit = bytes_to_target(self.data[base_key], target, self.k(model)) if base else None
        rows = []
        for key in keys:
            if key not in self.data:
                continue
            m = self.m[key]
            hit = bytes_to_target(self.data[key], target, self.k(model)) if target is not None else None
            rows.append({
                "key": key, "label": self.data[key].spec.label, "variant": self.data[key].spec.variant,
                "rounds": m["rounds"], "accuracy_smoothed": m["accuracy_smoothed"],
                "accuracy_final": m["accuracy_final"],
                "accuracy_best": m["accuracy_best"],
                "accuracy_delta": None if base is None else m["accuracy_smoothed"] - base["accuracy_smoothed"],
                "bytes_up": m["bytes_up"], "bytes_down": m["bytes_down"], "bytes_total": m["bytes_total"],
                "saving_total": None if key == base_key or base is None
                else saving(m["bytes_total"], base["bytes_total"]),
                "saving_up": None if key == base_key or base is None else saving(m["bytes_up"], base["bytes_up"]),
                "frozen_final": m["frozen_final"], "frozen_mean": m["frozen_mean"],
                "wall_s_per_round": m["wall_s_per_round"], "simulated_s_per_round": m["simulated_s_per_round"],
                "time_saving": None if key == base_key or base is None else saving(m["simulated_s_per_round"],
                                                                                   base["simulated_s_per_round"]),
                "transfer_s_per_round": m["transfer_s_per_round"],
                "transfer_saving": None if key == base_key or base is None else saving(m["transfer_s_per_round"],
                                                                                       base["transfer_s_per_round"]),
                "client_compute_s": m["client_compute_s"],
                "target": target, "target_round": hit and hit["round"], "bytes_to_target": hit and hit["bytes_total"],
                "saving_to_target": None if key == base_key or not hit or not base_hit
                else saving(hit["bytes_total"], base_hit["bytes_total"]),
                "threshold_final": m["threshold_final"], "tightened_at_rounds": m["tightened_at_rounds"],
            })
        return rows

    def accuracy_table(self, rows: list[dict[str, Any]], *, to_target: bool = True) -> str:
        header = ["run", "rounds", "accuracy", "Δ acc (points)", "uplink MB", "downlink MB", "total MB", "saving",
                  "frozen (final)"]
        if to_target:
            header += ["round at target", "MB to target", "saving to target"]
        out = []
        for r in rows:
            row = [r["label"], str(r["rounds"]), _acc(r["accuracy_smoothed"]),
                   "—" if r["key"].endswith("-fedavg") else _pts(r["accuracy_delta"]), _mb(r["bytes_up"]),
                   _mb(r["bytes_down"]), _mb(r["bytes_total"]), _pct(r["saving_total"]), _pct(r["frozen_final"])]
            if to_target:
                row += ["not reached" if r["target_round"] is None else str(r["target_round"]),
                        _mb(r["bytes_to_target"]), _pct(r["saving_to_target"])]
            out.append(row)
        return _table(header, out)

    def section(self, name: str, body: str, data: dict[str, Any] | None = None) -> str:
        exp = self.plan.experiments[name]
        self.json["experiments"][name] = {"title": exp.title, "runs": list(exp.runs),
                                          "complete": all(k in self.data for k in exp.runs), **(data or {})}
        return f"## {exp.title}\n\n*{exp.what}* (`--only {name}`)\n\n{body}\n"

    def acc_note(self, model: str) -> str:
        t = self.target(model)
        return (f"Accuracy is the mean of the last {self.k(model)} evaluations (the curves are noisy on these "
                f"non-IID splits); Δ is against FedAvg's, in percentage points. Savings are total bytes (up + down) "
                f"against FedAvg over the same rounds. The target is {TARGET_FRACTION:.0%} of FedAvg's smoothed final "
                f"accuracy" + (f" ({t:.4f})" if t is not None else "") + "; *MB to target* is the cumulative traffic "
                "at the first evaluation whose smoothed accuracy reaches it.")

    # ---- Table I / II -------------------------------------------------------------------------
    def table1(self, model: str) -> str:
        name = model
        keys = [f"{model}-fedavg", f"{model}-apf", f"{model}-apf-aggressive"]
        wl = self.plan.workloads[model]
        if not self.have(*keys):
            return self.section(name, f"Workload: {wl.description}.\n\n" + self.missing(name))
        rows = self.compare_rows(model, keys)
        paper = PAPER[model]
        time_rows = [[r["label"], _s(r["wall_s_per_round"]), _s(r["simulated_s_per_round"]), _pct(r["time_saving"]),
                      _s(r["transfer_s_per_round"], 3), _pct(r["transfer_saving"]), _s(r["client_compute_s"], 3),
                      _s(PAPER[model].get(_PAPER_ROUND[r["key"].removeprefix(model + "-")]), 2)] for r in rows]
        paper_line = (f"Paper (SPEC §6): {_mb(paper['bytes_fedavg'])} MB without APF, {_mb(paper['bytes_apf'])} MB "
                      f"with APF" + (f" ({_mb(paper['bytes_aggressive'])} MB aggressive)" if "bytes_aggressive" in paper
                                     else "") + f": {_pct(paper['saving'])}"
                      + (f" ({_pct(paper['saving_aggressive'])})" if "saving_aggressive" in paper else "")
                      + f" saved, per-round time {_pct(paper['time_saving'])} shorter, at no accuracy loss.")
        fig = self.plot(f"table1_{model}.png", lambda p: curves_figure(
            p, f"{MODEL_NAMES[model]}: FedAvg, APF and aggressive APF ({rows[0]['rounds']} rounds)",
            [(r["label"], self.data[r["key"]]) for r in rows], self.k(model), ("accuracy", "total_mb", "frozen"),
            target=self.target(model)))
        net = self.plan.workloads[model].base["cluster"]["pools"][0].get("network") or {}
        body = (f"Workload: {wl.description}; {rows[0]['rounds']} rounds, seed 0.\n\n**Table I** — traffic and "
                f"accuracy. {self.acc_note(model)}\n\n{self.accuracy_table(rows)}\n\n{paper_line}\n\n"
                f"**Table II** — per-round time: wall (this machine, shared, see the runs table for its load) and "
                f"simulated with the network model (uplink {net.get('up_mbps', 10.0):g} Mbit/s, downlink "
                f"{net.get('down_mbps', 50.0):g} Mbit/s, {net.get('latency_ms', 20.0):g} ms latency per message; the "
                f"round's critical path over its clients: download + measured compute + upload), and its transfer part "
                f"alone (the same critical path without compute: it depends only on the bytes, whereas measured "
                f"compute "
                f"depends on what else ran on the machine).\n\n"
                + _table(["run", "wall s / round", "simulated s / round", "saving", "transfer s / round", "saving",
                          "compute s / client", "paper s / round"], time_rows) + f"\n\n{fig}\n")
        return self.section(name, body, {"rows": rows, "paper": paper})

    # ---- Figs 5/6, 12, 13, 14 -----------------------------------------------------------------
    def strawmen(self) -> str:
        name, keys = "strawmen", list(self.plan.experiments["strawmen"].runs)
        if not self.have(*keys):
            return self.section(name, self.missing(name))
        rows = self.compare_rows("lenet5", keys)
        fig = self.plot("fig5_6_strawmen.png", lambda p: curves_figure(
            p, f"LeNet-5, non-IID label shards: partial sync and permanent freezing against APF (T = {APF_T})",
            [(r["label"], self.data[r["key"]]) for r in rows], self.k("lenet5"), ("accuracy", "total_mb", "frozen")))
        by = {r["key"]: r for r in rows}
        apf, ps, pf = by["lenet5-apf"], by["lenet5-partial-sync"], by["lenet5-permanent"]
        verdict = (f"Against FedAvg's accuracy: APF {_pts(apf['accuracy_delta'])} points, partial synchronisation "
                   f"{_pts(ps['accuracy_delta'])}, permanent freezing {_pts(pf['accuracy_delta'])}; all three freeze "
                   f"at the same T = {APF_T} (the strawmen's own default is 0.05). "
                   + _strawman_sentence("Partial synchronisation", ps, apf,
                                        "it keeps training \"stable\" scalars locally, so on this split (each client "
                                        "sees 1–2 classes) the clients drift apart")
                   + " " + _strawman_sentence("Permanent freezing", pf, apf,
                                              "it never thaws a scalar that was only temporarily stable"))
        return self.section(name, f"{self.acc_note('lenet5')}\n\n{self.accuracy_table(rows, to_target=False)}\n\n"
                                  f"{verdict}\n\n{fig}\n", {"rows": rows})

    def periods(self) -> str:
        name, keys = "periods", list(self.plan.experiments["periods"].runs)
        if not self.have(*keys):
            return self.section(name, self.missing(name))
        rows = self.compare_rows("lenet5", keys)
        for r in rows:
            if r["key"] == "lenet5-apf":
                r["label"] = "AIMD (APF)"
        fig = self.plot("fig12_periods.png", lambda p: curves_figure(
            p, "LeNet-5: how the freezing period is controlled",
            [(r["label"], self.data[r["key"]]) for r in rows], self.k("lenet5"), ("accuracy", "total_mb", "frozen")))
        text = ("Pure additive: L ± 1 (floor 0); pure multiplicative: stable L ← max(1, 2L), unstable L ← ⌊L/2⌋; "
                "fixed: a stable scalar is frozen for 10 checks, an unstable one not at all; AIMD: L + 1 when stable, "
                "⌊L/2⌋ when not. All at T = 0.2, α = 0.99, a check every round.")
        others = [r for r in rows if r["key"] not in ("lenet5-fedavg", "lenet5-apf")]
        aimd = next(r for r in rows if r["key"] == "lenet5-apf")
        summary = "Against AIMD: " + "; ".join(_versus(r, aimd) for r in others) + "."
        return self.section(name, f"{text} {self.acc_note('lenet5')}\n\n{self.accuracy_table(rows)}\n\n{summary}"
                                  f"\n\n{fig}\n", {"rows": rows})

    def baselines(self) -> str:
        name, keys = "baselines", list(self.plan.experiments["baselines"].runs)
        if not self.have(*keys):
            return self.section(name, self.missing(name))
        rows = self.compare_rows("lenet5", keys)
        target = self.target("lenet5")

        def draw(path: Path) -> None:
            plt = _plt()
            fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
            for i, r in enumerate(rows):
                rd = self.data[r["key"]]
                er, acc = rd.evals()
                total = (rd.column("cum_bytes_up") + rd.column("cum_bytes_down"))[er - 1] / 1e6
                a.plot(total, smoothed(acc, self.k("lenet5")), color=f"C{i}", label=r["label"])
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
            fig.suptitle("LeNet-5: APF against Gaia, CMFL and Top-k, and composed with int8 and Top-k")
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
            plt.close(fig)

        fig = self.plot("fig13_baselines.png", draw)
        text = ("Gaia sends a scalar when |Δ/w| exceeds a decaying threshold (1% ×0.99 per round, floor 0.1%); CMFL "
                "skips a client whose update agrees in sign with the last global update on fewer than half the "
                "scalars; Top-k sends the 10% largest |update + residual|; both sparsifiers keep an error-feedback "
                "residual. *At equal accuracy* means the bytes each needed to reach the same target accuracy.")
        reached = sorted((r for r in rows if r["bytes_to_target"] is not None), key=lambda r: r["bytes_to_target"])
        missed = [r["label"] for r in rows if r["bytes_to_target"] is None]
        order = ("From fewest to most bytes to the target: " + ", ".join(
            f"{r['label']} {_mb(r['bytes_to_target'])} MB" for r in reached) + "."
                 + (f" Never reached it: {', '.join(missed)}." if missed else ""))
        return self.section(name, f"{text} {self.acc_note('lenet5')}\n\n{self.accuracy_table(rows)}\n\n{order}"
                                  f"\n\n{fig}\n", {"rows": rows})

    def threshold(self) -> str:
        name, keys = "threshold", list(self.plan.experiments["threshold"].runs)
        if not self.have(*keys):
            return self.section(name, self.missing(name))
        rows = self.compare_rows("lenet5", keys)
        fig = self.plot("fig14_threshold.png", lambda p: curves_figure(
            p, "LeNet-5: a loose initial threshold, tightened whenever 80% of the scalars are frozen",
            [(r["label"], self.data[r["key"]]) for r in rows if r["key"] != "lenet5-fedavg"] +
            [("FedAvg", self.data["lenet5-fedavg"])], self.k("lenet5"), ("accuracy", "threshold", "frozen")))
        loose = next(r for r in rows if r["key"] == "lenet5-apf-loose")
        tight = loose["tightened_at_rounds"]
        text = (f"T starts at 0.8 and is halved (floor 1e-4) at every check where ≥ 80% of the scalars are frozen: "
                f"here {len(tight)} time(s)" + (f", at rounds {', '.join(map(str, tight[:12]))}"
                                               + (" …" if len(tight) > 12 else "") if tight else "")
                + f", ending at T = {loose['threshold_final']:.3g}. Accuracy against FedAvg: loose "
                f"{_pts(loose['accuracy_delta'])} points, APF at T = {APF_T} "
                f"{_pts(next(r for r in rows if r['key'] == 'lenet5-apf')['accuracy_delta'])}"
                + (" — the loose start did not cost final accuracy." if loose["accuracy_delta"] > -0.01 else
                   f" — {_pts(-loose['accuracy_delta']).lstrip('+')} points short of FedAvg at the end.")
                + ("" if tight else " (No tightening happened: the frozen fraction never reached 80%.)"))
        return self.section(name, f"{self.acc_note('lenet5')}\n\n{self.accuracy_table(rows)}\n\n{text}\n\n{fig}\n",
                            {"rows": rows})

    # ---- Table III ----------------------------------------------------------------------------
    def overhead(self, measured: dict[str, Any] | None) -> str:
        name = "overhead"
        if not measured:
            return self.section(name, f"*Not measured in this output folder yet*: `apf-ray reproduce"
                                      f"{' --quick' if self.plan.scale == 'quick' else ''} --only overhead --output "
                                      f"{self.out}`.")
        rows, data, in_run = [], {}, []
        for model, x in measured.items():
            apf, fed = self.m.get(f"{model}-apf"), self.m.get(f"{model}-fedavg")
            ctrl = (apf or {}).get("controller") or {}
            in_run_compute = (None if not apf or not fed or not fed["client_compute_s"]
                              else apf["client_compute_s"] / fed["client_compute_s"] - 1)
            ratio_state_model = x["controller_state_bytes"] / x["model_optimizer_bytes"]
            rss = (apf or {}).get("peak_rss_bytes")
            entry = {
                **x,
                "local_step_inflation": x["local_round_s_apf"] / x["local_round_s_fedavg"] - 1,
                "controller_share_of_local_round": x["controller_update_s"] / x["local_round_s_fedavg"],
                "controller_in_run_median_s": ctrl.get("median_s"),
                "controller_in_run_share_of_round": (None if not ctrl or not apf else
                                                     ctrl["median_s"] / apf["wall_s_per_round"]),
                "client_compute_in_run_fedavg_s": fed and fed["client_compute_s"],
                "client_compute_in_run_apf_s": apf and apf["client_compute_s"],
                "client_compute_in_run_inflation": in_run_compute,
                "state_over_model_optimizer": ratio_state_model,
                "apf_run_peak_rss_bytes": rss,
                "state_over_peak_rss": None if not rss else x["controller_state_bytes"] / rss,
                "paper": {k: PAPER[model][k] for k in ("compute_s", "compute_overhead", "memory_bytes",
                                                       "memory_overhead")},
            }
            data[model] = entry
            extra = x["controller_update_s"] + x["local_round_s_apf"] - x["local_round_s_fedavg"]
            entry["extra_s_per_round"] = extra
            entry["compute_inflation"] = extra / x["local_round_s_fedavg"]
            paper = PAPER[model]
            rows.append([MODEL_NAMES[model], f"{x['num_params']:,}",
                         f"{_ms(x['controller_update_s'])} / {_ms(entry['controller_in_run_median_s'])}",
                         f"{_s(x['local_round_s_fedavg'], 3)} / {_s(x['local_round_s_apf'], 3)}",
                         _signed_pct(entry["local_step_inflation"]), f"{extra:+.3f} s",
                         _signed_pct(entry["compute_inflation"]),
                         f"{paper['compute_s']:.3f} s ({_pct(paper['compute_overhead'])})",
                         f"{x['controller_state_bytes'] / 1e6:.2f} MB", _pct(ratio_state_model),
                         "—" if not rss else f"{rss / 1e6:,.0f} MB", _pct(entry["state_over_peak_rss"]),
                         f"{paper['memory_bytes'] / 1e6:g} MB ({_pct(paper['memory_overhead'])})"])
            if in_run_compute is not None:
                in_run.append(f"{MODEL_NAMES[model]} {_signed_pct(in_run_compute)}")
        text = ("APF adds work in two places here. **Server**: the controller's stability check on the global vector "
                "(measured alone on the model's real parameter count, a check every round, and timed inside each APF "
                "run); its state is 16 bytes per parameter (ref, E, A as float32; period and countdown as uint16). "
                "**Client**: the masked SGD step (gradient, weight decay and momentum zeroed at frozen positions), "
                "measured against FedAvg's plain step on the same data, interleaved, half the scalars frozen; and in "
                "the runs as the mean per-client compute of the APF run against the FedAvg run (those ran at different "
                "times on a shared machine, so the micro-benchmark is the fairer figure). **Memory**: the state "
                "against one copy of the model's weights + gradients (+ momentum), and against the APF run's peak "
                "resident memory (the whole process: framework, data, model copies — closer to what the paper "
                "measured). A client holds only the mask (1 byte per scalar while training; n/8 bytes on the wire).")
        table = _table(["model", "parameters", "controller update: alone / in the run", "local round s: FedAvg / APF",
                        "masked step", "APF extra per round", "compute inflation", "paper: extra (inflation)",
                        "state", "of weights + gradients (+ momentum)", "APF run peak RSS", "of peak RSS",
                        "paper: memory (inflation)"], rows)
        note = ("*APF extra per round* = the controller's update + the masked local round's extra time (clients "
                "train in parallel, the check runs once on the server); *compute inflation* = that over FedAvg's local "
                "round. The masked step costs a `torch.where` over every gradient tensor at every step, whatever the "
                "frozen fraction. "
                + ("In the runs themselves, APF's mean per-client compute against FedAvg's: " + ", ".join(in_run)
                   + " (those runs ran at different times on a shared machine, so the load shifts this figure)."
                   if in_run else ""))
        return self.section(name, f"{text}\n\n{table}\n\n{note}\n", {"models": data})

    # ---- Figs 1–3 -----------------------------------------------------------------------------
    def stability(self) -> str:
        name = "stability"
        fed, apf = self.data.get("lenet5-fedavg"), self.data.get("lenet5-apf")
        if fed is None or apf is None or fed.probe is None or apf.probe is None:
            return self.section(name, self.missing(name))
        (frows, fsum), (arows, asum) = fed.probe, apf.probe
        acc_r, acc = fed.evals()
        # of the sampled trajectories, the two that moved most under FedAvg (many scalars barely move)
        spread = np.ptp(np.array([r["values"] for r in frows]), axis=0)
        shown = [int(i) for i in np.argsort(-spread)[:2]]

        def fig1(path: Path) -> None:
            plt = _plt()
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
            for j, ax, rows, title in ((0, axes[0], frows, "FedAvg (no freezing)"),
                                       (1, axes[1], arows, "APF: the same two scalars, frozen rounds shaded")):
                for c, i in enumerate(shown):
                    values = [r["values"][i] for r in rows]
                    ax.plot([r["round"] for r in rows], values, color=f"C{c}",
                            label=f"scalar {fsum['trajectory_index'][i]} ({fsum['trajectory_layer'][i]})")
                    if j == 1:
                        frozen = np.array([r["frozen"][i] for r in rows])
                        for start, stop in _runs_of_true(frozen):
                            ax.axvspan(rows[start]["round"] + 0.5, rows[stop - 1]["round"] + 1.5, color=f"C{c}",
                                       alpha=0.15, lw=0)
                ax.set_ylabel("parameter value")
                ax.set_title(title)
                _round_axis(ax)
                ax.legend(fontsize=8, loc="upper left")
                twin = ax.twinx()
                er, ea = (acc_r, acc) if j == 0 else apf.evals()
                twin.plot(er, ea, color="grey", alpha=0.5, lw=0.8)
                twin.set_ylabel("test accuracy (fraction, grey)")
            fig.suptitle(f"Fig. 1 / 7 — LeNet-5 parameters over training (the 2 of {spread.size} random samples "
                         f"that moved most)")
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
            plt.close(fig)

        def fig2(path: Path) -> None:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(7, 4.2))
            for i, (rows, label) in enumerate(((frows, "FedAvg (the probe's EMAs, α = 0.99)"),
                                               (arows, "APF (the controller's E, A over active scalars)"))):
                pts = [(r["round"], r["p_mean"]) for r in rows if r["p_mean"] is not None]
                ax.plot(*zip(*pts, strict=True), color=f"C{i}", label=label)
            ax.axhline(APF_T, color="grey", ls=":", lw=1, label=f"T = {APF_T}")
            ax.set_ylabel("mean effective perturbation P = |E| / A")
            ax.set_title("Fig. 2 — mean effective perturbation of LeNet-5's scalars")
            _round_axis(ax)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
            plt.close(fig)

        def fig3(path: Path) -> None:
            plt = _plt()
            from matplotlib.ticker import MaxNLocator

            fig, ax = plt.subplots(figsize=(9, 4.4))
            layers = [entry["layer"] for entry in fsum["layers"]]
            x = np.arange(len(layers))
            for i, (summ, key, label) in enumerate(((fsum, "first_stable", f"FedAvg: first P < {APF_T}"),
                                                    (asum, "first_frozen", "APF: first frozen"))):
                med = np.array([e[key]["median"] if e[key]["median"] is not None else np.nan for e in summ["layers"]])
                lo = np.array([e[key]["p5"] if e[key]["p5"] is not None else np.nan for e in summ["layers"]])
                hi = np.array([e[key]["p95"] if e[key]["p95"] is not None else np.nan for e in summ["layers"]])
                ax.errorbar(x + (i - 0.5) * 0.25, med, yerr=[med - lo, hi - med], fmt="o", capsize=4, color=f"C{i}",
                            label=label)
            ax.set_xticks(x, layers, rotation=20)
            ax.set_xlabel("layer")
            ax.set_ylabel("round (median; bars: 5th–95th percentile)")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.set_title("Fig. 3 — the round at which LeNet-5's scalars become stable, per layer")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(path, dpi=DPI)
            plt.close(fig)

        f1, f2, f3 = (self.plot("fig1_trajectories.png", fig1), self.plot("fig2_perturbation.png", fig2),
                      self.plot("fig3_layers.png", fig3))
        layer_rows = []
        for fe, ae in zip(fsum["layers"], asum["layers"], strict=True):
            def cell(s: dict[str, Any]) -> str:
                if s["median"] is None:
                    return "none"
                return f"{s['median']:.0f} [{s['p5']:.0f}, {s['p95']:.0f}] ({_pct(s['fraction'])})"
            layer_rows.append([fe["layer"], f"{fe['size']:,}", str(fe["sampled"]), cell(fe["first_stable"]),
                               cell(ae["first_frozen"])])
        pf = [r["p_mean"] for r in frows if r["p_mean"] is not None]
        text = (f"A {apf.probe[1]['per_layer']}-scalar seeded sample per layer (every scalar of smaller layers) of the "
                f"two {len(frows)}-round LeNet-5 runs above, followed every round by "
                f"`apf_ray.stability_probe.StabilityProbe`. Under FedAvg the probe keeps the controller's EMAs itself "
                f"(α = 0.99, one check per round) and calls a scalar stable when P < {APF_T}; under APF it reads the "
                f"controller's state. Fig. 1 shows the 2 of {spread.size} randomly sampled scalars that moved most "
                f"under "
                f"FedAvg (most move far less). Under FedAvg the mean P goes from {pf[0]:.2f} (round 1) to {pf[-1]:.2f} "
                f"(round {len(frows)}), with {_pct(frows[-1]['stable_fraction'])} of the sample under T in the last "
                f"round; P near 1 means a scalar's updates keep one direction, near 0 that they cancel out "
                f"(oscillation around an optimum) — the paper's observation is that many scalars get there long "
                f"before accuracy stops rising.")
        table = _table(["layer", "scalars", "sampled", "FedAvg: first stable, median [5th, 95th] (share)",
                        "APF: first frozen, median [5th, 95th] (share)"], layer_rows)
        return self.section(name, f"{text}\n\n{f1}\n\n{f2}\n\n**Fig. 3** — rounds per layer (of the sampled "
                                  f"scalars that did; the share that did by the last round in parentheses):\n\n"
                                  f"{table}\n\n{f3}\n",
                            {"layers_fedavg": fsum["layers"], "layers_apf": asum["layers"],
                             "p_mean_fedavg": [[r["round"], r["p_mean"]] for r in frows],
                             "p_mean_apf": [[r["round"], r["p_mean"]] for r in arows],
                             "trajectory_index": fsum["trajectory_index"]})

    # ---- the gap to the paper ------------------------------------------------------------------
    def gap(self) -> str:
        name = "gap"
        rows, data = [], {}
        for model in ("lenet5", "lstm", "resnet18"):
            keys = [f"{model}-fedavg", f"{model}-apf", f"{model}-apf-aggressive"]
            if not self.have(*keys):
                continue
            cmp = {r["key"]: r for r in self.compare_rows(model, keys)}
            paper = PAPER[model]
            for key, paper_saving in ((f"{model}-apf", paper["saving"]),
                                      (f"{model}-apf-aggressive", paper.get("saving_aggressive"))):
                r, m = cmp[key], self.m[key]
                entry = {"model": model, "run": key, "label": r["label"], "rounds": r["rounds"],
                         "paper_saving": paper_saving, "saving": r["saving_total"],
                         "gap_points": None if paper_saving is None else r["saving_total"] - paper_saving,
                         "accuracy_delta": r["accuracy_delta"], "frozen_final": r["frozen_final"],
                         "frozen_rise_last_third": m["frozen_rise_last_third"]}
                data.setdefault("rows", []).append(entry)
                rows.append([MODEL_NAMES[model], r["label"], str(r["rounds"]), _pct(paper_saving),
                             _pct(r["saving_total"]),
                             _pts(entry["gap_points"]), _pts(r["accuracy_delta"]), _pct(r["frozen_final"]),
                             _pts(m["frozen_rise_last_third"])])
        if not rows:
            return self.section(name, self.missing(name))
        table = _table(["model", "run", "rounds", "paper saving", "saving here", "gap (points)", "Δ acc (points)",
                        "frozen (final)", "frozen rise, last third (points)"], rows)
        closers = self.closers(data)
        why = ("**Why it falls short.** (1) *Length*: APF saves only what is frozen, and a scalar needs many checks of "
               "cancelling updates before P = |E|/A falls under T (α = 0.99 averages ~100 checks), and then AIMD "
               "lengthens "
               "its period by one check per stable verdict — so the frozen fraction, and with it the saving, grows "
               "through the whole run (the last column: still rising in the last third). The paper's runs reach the "
               "stationary phase; these, sized for a shared 2-core CPU, are early in it (LSTM and ResNet-18 far more "
               "so: few local steps, few rounds). (2) *Scale*: small models on small data (LeNet-5 on Fashion-MNIST, a "
               "2 × 256 LSTM on 20 roles, ResNet-18 on a 10,000-image subset) train for fewer effective epochs. "
               f"(3) *Settings*: T, α, Fc and p decide when a scalar counts as stable; one T = {APF_T} is used for all "
               "three models here (the paper's default 0.05 freezes less in a short run, SPEC §6). (4) *What is "
               "counted*: every byte of both directions from real encoded buffers — framing, BatchNorm buffers (sent "
               "densely every round), the mask bitmap when it changes — which no freezing removes.")
        return self.section(name, f"Against SPEC §6 (the paper: LeNet-5 63.3%, LSTM 54.7%, aggressive ResNet-18 "
                                  f"53.8%, all at no accuracy loss). Savings are of total bytes (up + down); the paper "
                                  f"reports total transmission volume.\n\n{table}\n\n{why}\n\n{closers}\n", data)

    def closers(self, data: dict[str, Any]) -> str:
        """What closes the LeNet-5 gap: longer runs, tuned settings, composition with quantisation."""
        longer = [k for k in self.plan.runs if k.startswith("lenet5-apf-") and k.split("-")[-1].isdigit()]
        lines, out = [], []
        base300 = self.m.get("lenet5-fedavg")
        if longer and self.have(longer[0], longer[0].replace("apf", "fedavg"), "lenet5-apf"):
            key = longer[0]
            n = self.m[key]["rounds"]
            half = self.m["lenet5-apf"]["rounds"]
            apf_long, fed_long = self.data[key], self.data[key.replace("apf", "fedavg")]
            cmp = {r["key"]: r for r in self.compare_rows("lenet5", [key.replace("apf", "fedavg"), key])}
            r = cmp[key]
            fm = self.m[key.replace("apf", "fedavg")]
            acc_delta = r["accuracy_smoothed"] - fm["accuracy_smoothed"]
            late = window_saving(apf_long, fed_long, half, n)
            out.append({"what": f"APF continued to {n} rounds", "saving": saving(r["bytes_total"], fm["bytes_total"]),
                        "accuracy_delta": acc_delta, "late_saving": late, "frozen_final": r["frozen_final"]})
            lines.append([f"APF (T = {APF_T}), continued to {n} rounds (FedAvg too)", _pct(out[-1]["saving"]),
                          _pts(acc_delta), _pct(r["frozen_final"]),
                          f"rounds {half + 1}–{n} alone: {_pct(late)} saved"])
            self.plot("gap_lenet5.png", lambda p: curves_figure(
                p, f"LeNet-5: APF's saving keeps growing with training length ({n} rounds)",
                [("APF", apf_long), ("FedAvg", fed_long)], self.k("lenet5"), ("saving", "frozen", "accuracy"),
                baseline=fed_long))
        rounds300 = base300 and base300["rounds"]
        for key, what in (("lenet5-apf-aggressive", f"aggressive APF (p = 0.3), {rounds300} rounds"),
                          ("lenet5-apf-int8", "APF + int8 values (1 byte a value + a scale per 4096)"),
                          ("lenet5-apf-tuned", "APF with the Ray Tune search's best settings"),
                          ("lenet5-apf-tuned-int8", "the tuned settings + int8 values")):
            if key not in self.data or base300 is None:
                continue
            r = {x["key"]: x for x in self.compare_rows("lenet5", ["lenet5-fedavg", key])}[key]
            out.append({"what": what, "run": key, "saving": r["saving_total"], "accuracy_delta": r["accuracy_delta"],
                        "frozen_final": r["frozen_final"], "saving_up": r["saving_up"]})
            note = f"uplink alone {_pct(r['saving_up'])}" if key.endswith("int8") else ""
            if key == "lenet5-apf-tuned" and self.plan.tuned:
                note = f"from `{self.plan.tuned['search_command']}` ({Path(self.plan.tuned['file']).name})"
            lines.append([what + ("" if not key.startswith("lenet5-apf-tuned") else f": {r['label']}"),
                          _pct(r["saving_total"]),
                          _pts(r["accuracy_delta"]), _pct(r["frozen_final"]), note])
        ref = (self.plan.tuned or {}).get("runs", {})
        base_ref = ref.get("FedAvg")
        references = [("APF, the paper's defaults", "APF at the paper's defaults (T = 0.05, α = 0.99, Fc = 1)")]
        if "lenet5-apf-tuned" not in self.data:  # this report's own tuned run supersedes the search's trial
            options = (self.plan.tuned or {}).get("options", {})
            references.append(("APF, tuned", f"the Ray Tune search's best trial ({settings_label(options)})"))
        for name, what in references:
            other = ref.get(name)
            if not (base_ref and other and other.get("saving_total") is not None):
                continue
            delta = other["accuracy_last10"] - base_ref["accuracy_last10"]
            out.append({"what": f"{what}, from the Ray Tune bench", "saving": other["saving_total"],
                        "accuracy_delta": delta, "frozen_final": other["frozen_fraction_final"],
                        "source": self.plan.tuned["file"]})
            lines.append([f"for reference: {what}, {other['rounds']} rounds", _pct(other["saving_total"]), _pts(delta),
                          _pct(other["frozen_fraction_final"]),
                          f"not a run of this report: {Path(self.plan.tuned['file']).name} (accuracy: mean of the "
                          f"last 10 rounds)"])
        if self.plan.tuned is None:
            lines.append(["APF with Ray Tune's best settings", "pending", "—", "—",
                          "the search (`tune_configs/fashion-mnist-lenet5.yaml`) has not written its result yet"])
        data["closers"] = out
        if not lines:
            return ""
        text = ("**What closes it** (LeNet-5, where the paper's 63.3% is the target; savings against FedAvg over the "
                "same rounds, Δ accuracy in points):\n\n"
                + _table(["change", "saving", "Δ acc (points)", "frozen (final)", "note"], lines))
        if "gap_lenet5.png" in self.plots:
            text += "\n\n![gap_lenet5.png](gap_lenet5.png)"
        return text

    # ---- headline and the runs -----------------------------------------------------------------
    def headline(self) -> str:
        rows, data = [], []
        for model in ("lenet5", "lstm", "resnet18"):
            keys = [f"{model}-fedavg", f"{model}-apf", f"{model}-apf-aggressive"]
            if not self.have(*keys):
                rows.append([MODEL_NAMES[model], _pct(PAPER[model]["saving"]), "not run", "", "", "", ""])
                continue
            cmp = {r["key"]: r for r in self.compare_rows(model, keys)}
            a, g = cmp[f"{model}-apf"], cmp[f"{model}-apf-aggressive"]
            paper = PAPER[model]
            data.append({"model": model, "rounds": a["rounds"], "paper_saving": paper["saving"],
                         "paper_saving_aggressive": paper.get("saving_aggressive"), "saving_apf": a["saving_total"],
                         "saving_aggressive": g["saving_total"], "accuracy_delta_apf": a["accuracy_delta"],
                         "accuracy_delta_aggressive": g["accuracy_delta"], "time_saving_apf": a["time_saving"],
                         "transfer_saving_apf": a["transfer_saving"],
                         "paper_time_saving": paper["time_saving"], "accuracy_fedavg": cmp[f"{model}-fedavg"]
                         ["accuracy_smoothed"]})
            ps = _pct(paper["saving"]) + (f" ({_pct(paper['saving_aggressive'])})" if "saving_aggressive" in paper
                                          else "")
            rows.append([MODEL_NAMES[model], ps, f"{_pct(a['saving_total'])} ({_pct(g['saving_total'])})",
                         f"{_pts(a['accuracy_delta'])} ({_pts(g['accuracy_delta'])})", str(a["rounds"]),
                         f"{_pct(paper['time_saving'])} / {_pct(a['time_saving'])} ({_pct(a['transfer_saving'])})",
                         _acc(cmp[f"{model}-fedavg"]["accuracy_smoothed"])])
        self.json["headline"] = data
        return ("## Headline\n\nTotal bytes (up + down) saved against FedAvg over the same rounds; aggressive APF in "
                "parentheses; Δ accuracy in percentage points against FedAvg's smoothed accuracy.\n\n"
                + _table(["model", "paper saving", "saving here: APF (aggressive)", "Δ acc (points)", "rounds",
                          "per-round time saving, paper / here (transfer only)", "FedAvg accuracy"], rows) + "\n")

    def runs_table(self) -> str:
        rows, data, notes = [], {}, []
        for key, spec in self.plan.runs.items():
            rd, m = self.data.get(key), self.m.get(key)
            cfg_file = f"configs/{key}.yaml"
            cmd = (f"cp -r runs/{spec.extends} runs/{key} && apf-ray train --inprocess --resume runs/{key} "
                   f"--set train.rounds={spec.rounds}" if spec.extends else
                   f"apf-ray train --inprocess --config {cfg_file} --output runs/{key}")
            data[key] = {"label": spec.label, "model": spec.model, "variant": spec.variant, "rounds": spec.rounds,
                         "seed": spec.config["seed"], "dataset": spec.config["data"]["dataset"],
                         "status": "done" if rd else self.statuses.get(key, "not run"), "command": cmd,
                         "config_file": cfg_file, "extends": spec.extends, "probe": spec.probe,
                         "config": spec.config, "metrics": m}
            if rd is None:
                continue
            load = m["load_mean_1min"]
            stalls = _stalled_rounds(rd.column("wall_s"), rd.column("round"))
            if stalls:
                data[key]["stalled_rounds"] = stalls
                notes.append(f"`{key}`: round{'s' if len(stalls) > 1 else ''} "
                             + ", ".join(f"{r} ({_duration(s)})" for r, s in stalls)
                             + f" against a median of {_s(float(np.median(rd.column('wall_s'))))} s — without "
                             f"{'them' if len(stalls) > 1 else 'it'}, "
                             f"{_duration(m['run_wall_s'] - sum(s for _, s in stalls))}")
            rows.append([f"`{key}`", spec.label, spec.config["data"]["dataset"], str(m["rounds"]),
                         str(spec.config["seed"]), _duration(m["run_wall_s"]), _s(m["wall_s_per_round"]),
                         "—" if load is None else f"{load:.1f}", f"`{cmd}`"])
        self.json["runs"] = data
        return ("## Every run\n\nEach run's exact config is `configs/KEY.yaml` beside this report (the run folders, "
                "with journals and checkpoints, stay in `OUTPUT/runs/`, not committed); the command reruns it from "
                "the report's folder. Wall time is the sum of the run's round times (start-up excluded), with the "
                "machine's mean 1-minute load average while it ran. Continuations train the run they continue on "
                "from its last checkpoint.\n\n"
                + _table(["run", "what", "data", "rounds", "seed", "wall time", "s / round", "load", "command"], rows)
                + (f"\nRounds that stalled — over {STALL_FACTOR:g}× the run's median round and over "
                   f"{STALL_MIN_S:g} s: the process was paused or starved (a shared machine), so its wall time and "
                   "mean round time include them: " + "; ".join(notes) + ".\n" if notes else "")
                + "\n")



def _versus(row: dict[str, Any], ref: dict[str, Any]) -> str:
    """``pure additive saves 3.1 points more at -0.4 points of accuracy`` (total-bytes saving, smoothed accuracy)."""
    diff = row["saving_total"] - ref["saving_total"]
    return (f"{row['label']} saves {100 * abs(diff):.1f} points {'more' if diff >= 0 else 'less'} at "
            f"{_pts(row['accuracy_delta'] - ref['accuracy_delta'])} points of accuracy")


def _strawman_sentence(name: str, row: dict[str, Any], apf: dict[str, Any], why: str) -> str:
    """Whether a strawman lost accuracy against APF here (1 point is the margin), and the paper's reason."""
    gap = row["accuracy_delta"] - apf["accuracy_delta"]
    if gap < -0.01:
        return f"{name} ends {100 * -gap:.1f} points below APF, as in the paper: {why}."
    return (f"{name} does not end below APF here ({100 * gap:+.1f} points; the paper's reason — {why} — shows in the "
            f"curves, if at all, as larger dips).")


def _invocation_text(meta: dict[str, Any], load: dict[str, Any]) -> str:
    """How long training took: this invocation, or every invocation that trained into the folder."""
    inv = meta.get("invocations") or []
    if len(inv) <= 1:
        return (f"This invocation took {_duration(meta['wall_s'])} (mean 1-minute load average "
                f"{load.get('mean_1min_during', '—')}). ")
    parts = ", ".join(f"`{i['command']}` {_duration(i['wall_s'])} (load {i['load_average']['mean_1min_during']}"
                      + ("; stopped, its runs in flight resumed by the next" if i.get("interrupted") else "") + ")"
                      for i in inv)
    return (f"The runs were trained by {len(inv)} invocations, {_duration(meta['total_wall_s'])} in all: {parts}. ")


def _runs_of_true(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges where ``flags`` is True."""
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[::2], edges[1::2], strict=True))


def write_report(plan: Plan, out: Path, *, statuses: dict[str, str], meta: dict[str, Any],
                 overhead: dict[str, Any] | None) -> dict[str, Any]:
    """Write ``report.md``, the PNGs, ``configs/*.yaml`` and ``reproduce.json`` into ``out``; returns the JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    for key, spec in plan.runs.items():
        (configs / f"{key}.yaml").write_text(yaml.safe_dump(spec.config, sort_keys=False))
    rep = Report(plan, out, statuses)
    sections = [rep.headline(), rep.table1("lenet5"), rep.table1("lstm"), rep.table1("resnet18"), rep.gap(),
                rep.strawmen(), rep.periods(), rep.baselines(), rep.threshold(), rep.overhead(overhead),
                rep.stability(), rep.runs_table()]
    workloads = "\n".join(f"- **{MODEL_NAMES[m]}**: {w.description}." for m, w in plan.workloads.items())
    notes = "\n".join(f"- {n}" for n in plan.notes) or "- none"
    load = meta.get("load_average") or {}
    head = (f"# APF reproduction report ({plan.scale} scale)\n\n"
            f"`{meta['command']}` — {meta['date'][:10]}, {meta['machine']['cpus']}-core "
            f"{meta['machine']['cpu_model']}, niceness {meta['machine']['nice']}, {meta['jobs']} runs at a time. "
            + _invocation_text(meta, load) +
            "Every number below is in [`reproduce.json`](reproduce.json); the "
            "paper's are SPEC §6's (Tables I–III of Chen et al., ICDCS 2021). "
            + ("**Quick scale: toy data and a few rounds — a check that the pipeline works, not evidence.** "
               if plan.scale == "quick" else "")
            + f"All runs: in-process backend (the Ray backend gives the same bytes and accuracy, tested), seed 0, "
              f"APF with α = 0.99, a check every round, T = {APF_T}, Φ = 0.8.\n\n"
              f"Workloads:\n\n{workloads}\n\nSubstitutions and pending items:\n\n{notes}\n")
    text = head + "\n" + "\n".join(sections)
    (out / "report.md").write_text(text)
    result = {**meta, "scale": plan.scale, "notes": plan.notes, "target_fraction": TARGET_FRACTION,
              "apf_threshold": APF_T,
              "paper": PAPER, "tuned": plan.tuned,
              "workloads": {m: {"description": w.description, "smoothing_evals": w.smoothing} for m, w in
                            plan.workloads.items()},
              **rep.json, "plots": rep.plots, "overhead_measured": overhead}
    (out / "reproduce.json").write_text(json.dumps(_finite(result), indent=2, allow_nan=False) + "\n")
    return result


def _finite(x: Any) -> Any:
    """NaN and infinities (e.g. a percentile of nothing) become None: strict JSON."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        return _finite(x.item())
    return x
