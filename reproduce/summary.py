"""The report's first stage: run folders → ``reproduce.json``, every number and every plotted series.

:func:`summarise` reads the runs under ``OUTPUT/runs/`` (:mod:`.analysis`) and returns the
content of ``reproduce.json``: per experiment its rows (accuracy, bytes, savings against FedAvg,
bytes to target, times), the figures it draws (``figures``: their kind, title and which series)
and, under ``series``, the per-round curves of every plotted run. The next stages read only
that: :mod:`.figures` draws the PNGs and :mod:`.markdown` writes ``report.md``, so both can be
made again from ``reproduce.json`` alone. Units: bytes, seconds, accuracy as a fraction,
savings as fractions of FedAvg's bytes on the same workload and rounds, accuracy differences
as fractions (the report shows points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from apf_ray.derived import accuracy_gap
from reproduce.analysis import RunData, bytes_to_target, load_run, metrics, saving, window_saving
from reproduce.plan import APF_T, MODEL_NAMES, PAPER, TARGET_FRACTION, Plan, settings_label

STALL_FACTOR = 20.0
"""A round over this many times its run's median round (and over :data:`STALL_MIN_S`) stalled."""
STALL_MIN_S = 60.0
"""Seconds: shorter rounds never count as stalled, however fast the run's median."""
MODELS = ("lenet5", "lstm", "resnet18")


def stalled_rounds(wall_s: np.ndarray, rounds: np.ndarray) -> list[tuple[int, float]]:
    """(round, seconds) of the rounds that stalled: the process was stopped or starved, not working."""
    median = float(np.median(wall_s))
    return [(int(r), float(w)) for r, w in zip(rounds, wall_s, strict=True)
            if w > STALL_FACTOR * median and w > STALL_MIN_S]


def series(rd: RunData) -> dict[str, Any]:
    """What the figures plot of one run, per round: evaluated rounds and their raw accuracy, cumulative
    bytes (up + down), frozen fraction, and the threshold T where the strategy has one."""
    er, acc = rd.evals()
    return {"rounds": rd.column("round").astype(int).tolist(),
            "eval_rounds": er.tolist(), "accuracy": acc.tolist(),
            "cum_bytes_total": (rd.column("cum_bytes_up") + rd.column("cum_bytes_down")).tolist(),
            "frozen_fraction": rd.column("frozen_fraction").tolist(),
            "threshold": [[r["round"], r["threshold"]] for r in rd.rounds if r["threshold"] is not None]}


def _runs_of_true(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges where ``flags`` is True."""
    padded = np.concatenate([[False], flags.astype(bool), [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


class Summary:
    """Collects ``reproduce.json``: the experiments' data, the figures' specs and the plotted series."""

    def __init__(self, plan: Plan, out: Path, statuses: dict[str, str]) -> None:
        self.plan, self.out, self.statuses = plan, Path(out), statuses
        self.data: dict[str, RunData] = {}
        for key, spec in plan.runs.items():
            rd = load_run(self.out, spec)
            if rd is not None:
                self.data[key] = rd
        self.m = {key: metrics(rd, plan.workloads[rd.spec.model].smoothing) for key, rd in self.data.items()}
        self.json: dict[str, Any] = {"experiments": {}, "figures": {}, "series": {}}

    # helpers
    def k(self, model: str) -> int:
        return self.plan.workloads[model].smoothing

    def have(self, *keys: str) -> bool:
        return all(k in self.data for k in keys)

    def target(self, model: str) -> float | None:
        base = self.m.get(f"{model}-fedavg")
        return None if base is None else TARGET_FRACTION * base["accuracy_smoothed"]

    def figure(self, file: str, kind: str, title: str, runs: list[tuple[str, str]], **spec: Any) -> None:
        """A figure of ``kind`` over the runs ``[(label, key), ...]``; their series go into ``series``."""
        for _, key in runs:
            self.json["series"].setdefault(key, series(self.data[key]))
        self.json["figures"][file] = {"kind": kind, "title": title, "runs": [list(r) for r in runs], "target": None,
                                      **spec}

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
                "accuracy_delta": accuracy_gap(m["accuracy_smoothed"], base and base["accuracy_smoothed"]),
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

    def section(self, name: str, data: dict[str, Any] | None = None) -> None:
        exp = self.plan.experiments[name]
        self.json["experiments"][name] = {"title": exp.title, "what": exp.what, "runs": list(exp.runs),
                                          "complete": all(k in self.data for k in exp.runs), **(data or {})}

    # ---- Table I / II -------------------------------------------------------------------------
    def table1(self, model: str) -> None:
        keys = [f"{model}-fedavg", f"{model}-apf", f"{model}-apf-aggressive"]
        if not self.have(*keys):
            return self.section(model)
        rows = self.compare_rows(model, keys)
        self.figure(f"table1_{model}.png", "curves",
                    f"{MODEL_NAMES[model]}: FedAvg, APF and aggressive APF ({rows[0]['rounds']} rounds)",
                    [(r["label"], r["key"]) for r in rows], model=model, panels=["accuracy", "total_mb", "frozen"],
                    target=self.target(model))
        net = self.plan.workloads[model].base["cluster"]["pools"][0].get("network") or {}
        self.section(model, {"rows": rows, "paper": PAPER[model], "network": net,
                             "figures": [f"table1_{model}.png"]})

    # ---- Figs 5/6, 12, 13, 14 and the rivals ---------------------------------------------------
    def _lenet5_experiment(self, name: str, file: str, title: str, panels: list[str], *,
                           relabel: dict[str, str] | None = None, fedavg_last: bool = False,
                           kind: str = "curves", target: bool = False) -> None:
        keys = list(self.plan.experiments[name].runs)
        if not self.have(*keys):
            return self.section(name)
        rows = self.compare_rows("lenet5", keys)
        for r in rows:
            r["label"] = (relabel or {}).get(r["key"], r["label"])
        shown = [(r["label"], r["key"]) for r in rows]
        if fedavg_last:
            shown = [s for s in shown if s[1] != "lenet5-fedavg"] + [("FedAvg", "lenet5-fedavg")]
        self.figure(file, kind, title, shown, model="lenet5", panels=panels,
                    target=self.target("lenet5") if target else None)
        self.section(name, {"rows": rows, "figures": [file]})

    def strawmen(self) -> None:
        self._lenet5_experiment(
            "strawmen", "fig5_6_strawmen.png",
            f"LeNet-5, non-IID label shards: partial sync and permanent freezing against APF (T = {APF_T})",
            ["accuracy", "total_mb", "frozen"])

    def periods(self) -> None:
        self._lenet5_experiment("periods", "fig12_periods.png", "LeNet-5: how the freezing period is controlled",
                                ["accuracy", "total_mb", "frozen"], relabel={"lenet5-apf": "AIMD (APF)"})

    def baselines(self) -> None:
        self._lenet5_experiment("baselines", "fig13_baselines.png",
                                "LeNet-5: APF against Gaia, CMFL and Top-k, and composed with int8 and Top-k",
                                [], kind="traffic", target=True)

    def rivals(self) -> None:
        self._lenet5_experiment("rivals", "rivals_lenet5.png",
                                "LeNet-5: APF against FedProx and GWPF, alone and composed with Top-k",
                                ["accuracy", "total_mb", "frozen"], target=True)

    def threshold(self) -> None:
        self._lenet5_experiment(
            "threshold", "fig14_threshold.png",
            "LeNet-5: a loose initial threshold, tightened whenever 80% of the scalars are frozen",
            ["accuracy", "threshold", "frozen"], fedavg_last=True)

    # ---- Table III ----------------------------------------------------------------------------
    def overhead(self, measured: dict[str, Any] | None) -> None:
        if not measured:
            return self.section("overhead")
        data = {}
        for model, x in measured["models"].items():
            apf, fed = self.m.get(f"{model}-apf"), self.m.get(f"{model}-fedavg")
            ctrl = (apf or {}).get("controller") or {}
            rss = (apf or {}).get("peak_rss_bytes")
            extra = x["controller_update_s"] + x["local_round_s_apf"] - x["local_round_s_fedavg"]
            data[model] = {
                **x,
                "local_step_inflation": x["local_round_s_apf"] / x["local_round_s_fedavg"] - 1,
                "controller_share_of_local_round": x["controller_update_s"] / x["local_round_s_fedavg"],
                "controller_in_run_median_s": ctrl.get("median_s"),
                "controller_in_run_share_of_round": (None if not ctrl or not apf else
                                                     ctrl["median_s"] / apf["wall_s_per_round"]),
                "client_compute_in_run_fedavg_s": fed and fed["client_compute_s"],
                "client_compute_in_run_apf_s": apf and apf["client_compute_s"],
                "client_compute_in_run_inflation": (None if not apf or not fed or not fed["client_compute_s"]
                                                    else apf["client_compute_s"] / fed["client_compute_s"] - 1),
                "state_over_model_optimizer": x["controller_state_bytes"] / x["model_optimizer_bytes"],
                "apf_run_peak_rss_bytes": rss,
                "state_over_peak_rss": None if not rss else x["controller_state_bytes"] / rss,
                "paper": {k: PAPER[model][k] for k in ("compute_s", "compute_overhead", "memory_bytes",
                                                       "memory_overhead")},
                "extra_s_per_round": extra,
                "compute_inflation": extra / x["local_round_s_fedavg"],
            }
        self.section("overhead", {"models": data, "measured": {k: measured.get(k) for k in ("date", "machine",
                                                                                           "load_average")}})

    # ---- Figs 1–3 -----------------------------------------------------------------------------
    def stability(self) -> None:
        fed, apf = self.data.get("lenet5-fedavg"), self.data.get("lenet5-apf")
        if fed is None or apf is None or fed.probe is None or apf.probe is None:
            return self.section("stability")
        (frows, fsum), (arows, asum) = fed.probe, apf.probe
        # of the sampled trajectories, the two that moved most under FedAvg (many scalars barely move)
        spread = np.ptp(np.array([r["values"] for r in frows]), axis=0)
        shown = [int(i) for i in np.argsort(-spread)[:2]]
        trajectories = {
            "sampled": int(spread.size),
            "scalars": [{"index": fsum["trajectory_index"][i], "layer": fsum["trajectory_layer"][i]} for i in shown],
            "fedavg": {"rounds": [r["round"] for r in frows], "values": [[r["values"][i] for r in frows]
                                                                         for i in shown]},
            "apf": {"rounds": [r["round"] for r in arows], "values": [[r["values"][i] for r in arows] for i in shown],
                    "frozen_spans": [[[arows[a]["round"], arows[b - 1]["round"]]
                                      for a, b in _runs_of_true(np.array([r["frozen"][i] for r in arows]))]
                                     for i in shown]},
        }
        self.figure("fig1_trajectories.png", "trajectories",
                    f"Fig. 1 / 7 — LeNet-5 parameters over training (the 2 of {spread.size} random samples "
                    f"that moved most)", [("FedAvg (no freezing)", "lenet5-fedavg"),
                                          ("APF: the same two scalars, frozen rounds shaded", "lenet5-apf")])
        self.figure("fig2_perturbation.png", "perturbation", "Fig. 2 — mean effective perturbation of LeNet-5's "
                    "scalars", [("FedAvg (the probe's EMAs, α = 0.99)", "lenet5-fedavg"),
                                ("APF (the controller's E, A over active scalars)", "lenet5-apf")], threshold=APF_T)
        self.figure("fig3_layers.png", "layers", "Fig. 3 — the round at which LeNet-5's scalars become stable, "
                    "per layer", [(f"FedAvg: first P < {APF_T}", "lenet5-fedavg"), ("APF: first frozen", "lenet5-apf")])
        self.section("stability", {
            "layers_fedavg": fsum["layers"], "layers_apf": asum["layers"],
            "p_mean_fedavg": [[r["round"], r["p_mean"]] for r in frows],
            "p_mean_apf": [[r["round"], r["p_mean"]] for r in arows],
            "trajectory_index": fsum["trajectory_index"], "trajectories": trajectories,
            "per_layer": apf.probe[1]["per_layer"], "stable_fraction_last": frows[-1]["stable_fraction"],
            "figures": ["fig1_trajectories.png", "fig2_perturbation.png", "fig3_layers.png"]})

    # ---- the gap to the paper ------------------------------------------------------------------
    def gap(self) -> None:
        data: dict[str, Any] = {}
        for model in MODELS:
            keys = [f"{model}-fedavg", f"{model}-apf", f"{model}-apf-aggressive"]
            if not self.have(*keys):
                continue
            cmp = {r["key"]: r for r in self.compare_rows(model, keys)}
            paper = PAPER[model]
            for key, paper_saving in ((f"{model}-apf", paper["saving"]),
                                      (f"{model}-apf-aggressive", paper.get("saving_aggressive"))):
                r, m = cmp[key], self.m[key]
                data.setdefault("rows", []).append({
                    "model": model, "run": key, "label": r["label"], "rounds": r["rounds"],
                    "paper_saving": paper_saving, "saving": r["saving_total"],
                    "gap_points": None if paper_saving is None else r["saving_total"] - paper_saving,
                    "accuracy_delta": r["accuracy_delta"], "frozen_final": r["frozen_final"],
                    "frozen_rise_last_third": m["frozen_rise_last_third"]})
        if data:
            self.closers(data)
        self.section("gap", data)

    def closers(self, data: dict[str, Any]) -> None:
        """What closes the LeNet-5 gap: longer runs, tuned settings, composition with quantisation."""
        longer = [k for k in self.plan.runs if k.startswith("lenet5-apf-") and k.split("-")[-1].isdigit()]
        out: list[dict[str, Any]] = []
        base300 = self.m.get("lenet5-fedavg")
        if longer and self.have(longer[0], longer[0].replace("apf", "fedavg"), "lenet5-apf"):
            key = longer[0]
            fed_key = key.replace("apf", "fedavg")
            n, half = self.m[key]["rounds"], self.m["lenet5-apf"]["rounds"]
            r = {x["key"]: x for x in self.compare_rows("lenet5", [fed_key, key])}[key]
            fm = self.m[fed_key]
            out.append({"what": f"APF continued to {n} rounds", "saving": saving(r["bytes_total"], fm["bytes_total"]),
                        "accuracy_delta": accuracy_gap(r["accuracy_smoothed"], fm["accuracy_smoothed"]),
                        "late_saving": window_saving(self.data[key], self.data[fed_key], half, n),
                        "frozen_final": r["frozen_final"], "run": key, "from_round": half + 1, "rounds": n})
            self.figure("gap_lenet5.png", "curves", f"LeNet-5: APF's saving keeps growing with training length "
                        f"({n} rounds)", [("APF", key), ("FedAvg", fed_key)], model="lenet5",
                        panels=["saving", "frozen", "accuracy"], baseline=fed_key)
            data["figures"] = ["gap_lenet5.png"]
        rounds300 = base300 and base300["rounds"]
        for key, what in (("lenet5-apf-aggressive", f"aggressive APF (p = 0.3), {rounds300} rounds"),
                          ("lenet5-apf-int8", "APF + int8 values (1 byte a value + a scale per 4096)"),
                          ("lenet5-apf-tuned", "APF with the Ray Tune search's best settings"),
                          ("lenet5-apf-tuned-int8", "the tuned settings + int8 values")):
            if key not in self.data or base300 is None:
                continue
            r = {x["key"]: x for x in self.compare_rows("lenet5", ["lenet5-fedavg", key])}[key]
            out.append({"what": what, "run": key, "saving": r["saving_total"], "accuracy_delta": r["accuracy_delta"],
                        "frozen_final": r["frozen_final"], "saving_up": r["saving_up"], "label": r["label"]})
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
            out.append({"what": f"{what}, from the Ray Tune bench", "saving": other["saving_total"],
                        "accuracy_delta": other["accuracy_last10"] - base_ref["accuracy_last10"],
                        "frozen_final": other["frozen_fraction_final"], "source": self.plan.tuned["file"],
                        "reference": what, "rounds": other["rounds"]})
        data["closers"] = out

    # ---- headline and the runs -----------------------------------------------------------------
    def headline(self) -> None:
        data = []
        for model in MODELS:
            keys = [f"{model}-fedavg", f"{model}-apf", f"{model}-apf-aggressive"]
            if not self.have(*keys):
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
        self.json["headline"] = data

    def runs(self) -> None:
        data = {}
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
            stalls = stalled_rounds(rd.column("wall_s"), rd.column("round"))
            data[key]["median_round_s"] = float(np.median(rd.column("wall_s")))
            if stalls:
                data[key]["stalled_rounds"] = stalls
        self.json["runs"] = data


def summarise(plan: Plan, out: Path, *, statuses: dict[str, str], meta: dict[str, Any],
              overhead: dict[str, Any] | None) -> dict[str, Any]:
    """``reproduce.json``'s content for the run folders under ``out/runs``: ``meta`` (the invocation:
    command, date, machine, load, jobs), the plan, every experiment's data, figures and series."""
    s = Summary(plan, out, statuses)
    s.headline()
    for model in MODELS:
        s.table1(model)
    s.gap()
    s.strawmen()
    s.periods()
    s.baselines()
    s.rivals()
    s.threshold()
    s.overhead(overhead)
    s.stability()
    s.runs()
    return {**meta, "scale": plan.scale, "output": str(out), "notes": plan.notes, "target_fraction": TARGET_FRACTION,
            "apf_threshold": APF_T, "paper": PAPER, "tuned": plan.tuned,
            "workloads": {m: {"description": w.description, "smoothing_evals": w.smoothing} for m, w in
                          plan.workloads.items()},
            **s.json, "plots": list(s.json["figures"]), "overhead_measured": overhead}
