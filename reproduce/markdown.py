"""The report's third stage: ``reproduce.json`` → ``report.md``, from that file's data alone.

:func:`render` writes every table and sentence of the report from the content
:func:`reproduce.summary.summarise` wrote; the plots it links are those :mod:`.figures` drew.
Shown units: MB = 10⁶ bytes, seconds, accuracy as a fraction, savings in percent of FedAvg's
bytes, accuracy differences in percentage points.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reproduce.plan import MODEL_NAMES
from reproduce.summary import MODELS, STALL_FACTOR, STALL_MIN_S

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


def _fig(name: str) -> str:
    return f"![{name}]({name})"


class Markdown:
    """The report's sections, each from its experiment's entry of ``reproduce.json``."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.d = data
        self.exps: dict[str, dict[str, Any]] = data["experiments"]
        self.paper: dict[str, dict[str, Any]] = data["paper"]
        self.apf_t = data["apf_threshold"]

    def k(self, model: str) -> int:
        return self.d["workloads"][model]["smoothing_evals"]

    def target(self, rows: list[dict[str, Any]]) -> float | None:
        return rows[0]["target"] if rows else None

    def missing(self, name: str) -> str:
        runs = self.d["runs"]
        absent = [k for k in self.exps[name]["runs"] if runs[k]["status"] != "done"]
        failed = [f"`{k}` ({runs[k]['status']})" for k in absent if runs[k]["status"].startswith("failed")]
        text = (f"*Not run in this output folder yet* (missing: {', '.join(f'`{k}`' for k in absent)}): "
                f"`apf-ray reproduce{' --quick' if self.d['scale'] == 'quick' else ''} --only {name} "
                f"--output {self.d['output']}`.")
        return text + (f" Failed: {', '.join(failed)}." if failed else "")

    def not_run(self, name: str) -> str | None:
        """Experiment ``name``'s section saying how to run it while its runs are missing; None once it has rows."""
        return None if "rows" in self.exps[name] else self.section(name, self.missing(name))

    def section(self, name: str, body: str) -> str:
        exp = self.exps[name]
        return f"## {exp['title']}\n\n*{exp['what']}* (`--only {name}`)\n\n{body}\n"

    def acc_note(self, model: str, target: float | None) -> str:
        return (f"Accuracy is the mean of the last {self.k(model)} evaluations (the curves are noisy on these "
                f"non-IID splits); Δ is against FedAvg's, in percentage points. Savings are total bytes (up + down) "
                f"against FedAvg over the same rounds. The target is {self.d['target_fraction']:.0%} of FedAvg's "
                f"smoothed final accuracy" + (f" ({target:.4f})" if target is not None else "")
                + "; *MB to target* is the cumulative traffic at the first evaluation whose smoothed accuracy "
                "reaches it.")

    @staticmethod
    def accuracy_table(rows: list[dict[str, Any]], *, to_target: bool = True) -> str:
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

    # ---- Table I / II -------------------------------------------------------------------------
    def table1(self, model: str) -> str:
        exp = self.exps[model]
        description = self.d["workloads"][model]["description"]
        if "rows" not in exp:
            return self.section(model, f"Workload: {description}.\n\n" + self.missing(model))
        rows, paper, net = exp["rows"], self.paper[model], exp["network"]
        time_rows = [[r["label"], _s(r["wall_s_per_round"]), _s(r["simulated_s_per_round"]), _pct(r["time_saving"]),
                      _s(r["transfer_s_per_round"], 3), _pct(r["transfer_saving"]), _s(r["client_compute_s"], 3),
                      _s(paper.get(_PAPER_ROUND[r["key"].removeprefix(model + "-")]), 2)] for r in rows]
        paper_line = (f"Paper (SPEC §6): {_mb(paper['bytes_fedavg'])} MB without APF, {_mb(paper['bytes_apf'])} MB "
                      f"with APF" + (f" ({_mb(paper['bytes_aggressive'])} MB aggressive)" if "bytes_aggressive" in paper
                                     else "") + f": {_pct(paper['saving'])}"
                      + (f" ({_pct(paper['saving_aggressive'])})" if "saving_aggressive" in paper else "")
                      + f" saved, per-round time {_pct(paper['time_saving'])} shorter, at no accuracy loss.")
        body = (f"Workload: {description}; {rows[0]['rounds']} rounds, seed 0.\n\n**Table I** — traffic and "
                f"accuracy. {self.acc_note(model, self.target(rows))}\n\n{self.accuracy_table(rows)}\n\n"
                f"{paper_line}\n\n"
                f"**Table II** — per-round time: wall (this machine, shared, see the runs table for its load) and "
                f"simulated with the network model (uplink {net.get('up_mbps', 10.0):g} Mbit/s, downlink "
                f"{net.get('down_mbps', 50.0):g} Mbit/s, {net.get('latency_ms', 20.0):g} ms latency per message; the "
                f"round's critical path over its clients: download + measured compute + upload), and its transfer part "
                f"alone (the same critical path without compute: it depends only on the bytes, whereas measured "
                f"compute "
                f"depends on what else ran on the machine).\n\n"
                + _table(["run", "wall s / round", "simulated s / round", "saving", "transfer s / round", "saving",
                          "compute s / client", "paper s / round"], time_rows)
                + f"\n\n{_fig(exp['figures'][0])}\n")
        return self.section(model, body)

    # ---- Figs 5/6, 12, 13, 14 and the rivals ---------------------------------------------------
    def lenet5_section(self, name: str, lead: str, after: str, *, to_target: bool = True) -> str:
        """A LeNet-5 experiment: ``lead``, how accuracy and savings are measured, its table, ``after``, its plot."""
        exp = self.exps[name]
        rows = exp["rows"]
        return self.section(name, f"{lead}{self.acc_note('lenet5', self.target(rows))}\n\n"
                                  f"{self.accuracy_table(rows, to_target=to_target)}\n\n{after}\n\n"
                                  f"{_fig(exp['figures'][0])}\n")

    def strawmen(self) -> str:
        if (not_run := self.not_run("strawmen")) is not None:
            return not_run
        rows = self.exps["strawmen"]["rows"]
        by = {r["key"]: r for r in rows}
        apf, ps, pf = by["lenet5-apf"], by["lenet5-partial-sync"], by["lenet5-permanent"]
        verdict = (f"Against FedAvg's accuracy: APF {_pts(apf['accuracy_delta'])} points, partial synchronisation "
                   f"{_pts(ps['accuracy_delta'])}, permanent freezing {_pts(pf['accuracy_delta'])}; all three freeze "
                   f"at the same T = {self.apf_t} (the strawmen's own default is 0.05). "
                   + _strawman_sentence("Partial synchronisation", ps, apf,
                                        "it keeps training \"stable\" scalars locally, so on this split (each client "
                                        "sees 1–2 classes) the clients drift apart")
                   + " " + _strawman_sentence("Permanent freezing", pf, apf,
                                              "it never thaws a scalar that was only temporarily stable"))
        return self.lenet5_section("strawmen", "", verdict, to_target=False)

    def periods(self) -> str:
        if (not_run := self.not_run("periods")) is not None:
            return not_run
        rows = self.exps["periods"]["rows"]
        text = ("Pure additive: L ± 1 (floor 0); pure multiplicative: stable L ← max(1, 2L), unstable L ← ⌊L/2⌋; "
                "fixed: a stable scalar is frozen for 10 checks, an unstable one not at all; AIMD: L + 1 when stable, "
                "⌊L/2⌋ when not. All at T = 0.2, α = 0.99, a check every round.")
        return self.lenet5_section("periods", f"{text} ", _against_apf(rows, "AIMD"))

    def baselines(self) -> str:
        if (not_run := self.not_run("baselines")) is not None:
            return not_run
        rows = self.exps["baselines"]["rows"]
        text = ("Gaia sends a scalar when |Δ/w| exceeds a decaying threshold (1% ×0.99 per round, floor 0.1%); CMFL "
                "skips a client whose update agrees in sign with the last global update on fewer than half the "
                "scalars; Top-k sends the 10% largest |update + residual|; both sparsifiers keep an error-feedback "
                "residual. *At equal accuracy* means the bytes each needed to reach the same target accuracy.")
        return self.lenet5_section("baselines", f"{text} ", _target_order(rows))

    def rivals(self) -> str:
        if (not_run := self.not_run("rivals")) is not None:
            return not_run
        rows = self.exps["rivals"]["rows"]
        text = ("FedProx adds the proximal term μ/2·‖w − w_global‖² to every client's local loss and sends every "
                "scalar, as FedAvg does; GWPF (Computer Networks 2024) freezes, on the server, the scalars whose "
                "moving average of relative update per round falls under its threshold, and thaws one when enough "
                "clients vote that its local change has grown (the votes are counted in the uplink) — "
                "`apf_ray/strategies/gwpf.py` says where it differs from the paper. Top-k (10%, error feedback) is "
                "composed after each strategy's own encoding, as with APF in Fig. 13. One seed: a comparison at "
                "this workload and length, not a verdict between the methods.")
        return self.lenet5_section("rivals", f"{text} ", f"{_against_apf(rows, 'APF')} {_target_order(rows)}")

    def threshold(self) -> str:
        if (not_run := self.not_run("threshold")) is not None:
            return not_run
        rows = self.exps["threshold"]["rows"]
        loose = next(r for r in rows if r["key"] == "lenet5-apf-loose")
        tight = loose["tightened_at_rounds"]
        text = (f"T starts at 0.8 and is halved (floor 1e-4) at every check where ≥ 80% of the scalars are frozen: "
                f"here {len(tight)} time(s)" + (f", at rounds {', '.join(map(str, tight[:12]))}"
                                               + (" …" if len(tight) > 12 else "") if tight else "")
                + f", ending at T = {loose['threshold_final']:.3g}. Accuracy against FedAvg: loose "
                f"{_pts(loose['accuracy_delta'])} points, APF at T = {self.apf_t} "
                f"{_pts(next(r for r in rows if r['key'] == 'lenet5-apf')['accuracy_delta'])}"
                + (" — the loose start did not cost final accuracy." if loose["accuracy_delta"] > -0.01 else
                   f" — {_pts(-loose['accuracy_delta']).lstrip('+')} points short of FedAvg at the end.")
                + ("" if tight else " (No tightening happened: the frozen fraction never reached 80%.)"))
        return self.lenet5_section("threshold", "", text)

    # ---- Table III ----------------------------------------------------------------------------
    def overhead(self) -> str:
        measured = self.exps["overhead"].get("models")
        if not measured:
            return self.section("overhead", f"*Not measured in this output folder yet*: `apf-ray reproduce"
                                            f"{' --quick' if self.d['scale'] == 'quick' else ''} --only overhead "
                                            f"--output {self.d['output']}`.")
        rows, in_run = [], []
        for model, x in measured.items():
            paper, rss = x["paper"], x["apf_run_peak_rss_bytes"]
            rows.append([MODEL_NAMES[model], f"{x['num_params']:,}",
                         f"{_ms(x['controller_update_s'])} / {_ms(x['controller_in_run_median_s'])}",
                         f"{_s(x['local_round_s_fedavg'], 3)} / {_s(x['local_round_s_apf'], 3)}",
                         _signed_pct(x["local_step_inflation"]), f"{x['extra_s_per_round']:+.3f} s",
                         _signed_pct(x["compute_inflation"]),
                         f"{paper['compute_s']:.3f} s ({_pct(paper['compute_overhead'])})",
                         f"{x['controller_state_bytes'] / 1e6:.2f} MB", _pct(x["state_over_model_optimizer"]),
                         "—" if not rss else f"{rss / 1e6:,.0f} MB", _pct(x["state_over_peak_rss"]),
                         f"{paper['memory_bytes'] / 1e6:g} MB ({_pct(paper['memory_overhead'])})"])
            if x["client_compute_in_run_inflation"] is not None:
                in_run.append(f"{MODEL_NAMES[model]} {_signed_pct(x['client_compute_in_run_inflation'])}")
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
        when = self.exps["overhead"].get("measured") or {}
        if when.get("date"):
            text += (f" The micro-benchmark ran {when['date'][:10]} on a {when['machine']['cpus']}-core "
                     f"{when['machine']['cpu_model']} (mean 1-minute load {when['load_average']['mean_1min_during']}); "
                     "the figures *in the run* and the peak RSS are the runs', from when and where they trained "
                     "(the report's head and the runs table).")
        else:
            text += (" When, where, at what load and with which masked step the micro-benchmark ran was not recorded "
                     "with it; the notes at the report's head say what is known.")
        table = _table(["model", "parameters", "controller update: alone / in the run", "local round s: FedAvg / APF",
                        "masked step", "APF extra per round", "compute inflation", "paper: extra (inflation)",
                        "state", "of weights + gradients (+ momentum)", "APF run peak RSS", "of peak RSS",
                        "paper: memory (inflation)"], rows)
        note = ("*APF extra per round* = the controller's update + the masked local round's extra time (clients "
                "train in parallel, the check runs once on the server); *compute inflation* = that over FedAvg's local "
                "round. The masked step is the plain step plus one `index_fill_` that zeroes the flat gradient, weight "
                "decay's term included, at the frozen positions (listed once per local round) before momentum uses "
                "it: its cost grows with the number of frozen scalars, and with none frozen there is nothing to fill. "
                + ("In the runs themselves, APF's mean per-client compute against FedAvg's: " + ", ".join(in_run)
                   + " (those runs ran at different times on a shared machine, so the load shifts this figure)."
                   if in_run else ""))
        return self.section("overhead", f"{text}\n\n{table}\n\n{note}\n")

    # ---- Figs 1–3 -----------------------------------------------------------------------------
    def stability(self) -> str:
        exp = self.exps["stability"]
        if "layers_fedavg" not in exp:
            return self.section("stability", self.missing("stability"))
        f1, f2, f3 = (_fig(f) for f in exp["figures"])
        layer_rows = []
        for fe, ae in zip(exp["layers_fedavg"], exp["layers_apf"], strict=True):
            def cell(s: dict[str, Any]) -> str:
                if s["median"] is None:
                    return "none"
                return f"{s['median']:.0f} [{s['p5']:.0f}, {s['p95']:.0f}] ({_pct(s['fraction'])})"
            layer_rows.append([fe["layer"], f"{fe['size']:,}", str(fe["sampled"]), cell(fe["first_stable"]),
                               cell(ae["first_frozen"])])
        pf = [p for _, p in exp["p_mean_fedavg"] if p is not None]
        rounds, sampled = len(exp["p_mean_fedavg"]), exp["trajectories"]["sampled"]
        text = (f"A {exp['per_layer']}-scalar seeded sample per layer (every scalar of smaller layers) of the "
                f"two {rounds}-round LeNet-5 runs above, followed every round by "
                f"`apf_ray.stability_probe.StabilityProbe`. Under FedAvg the probe keeps the controller's EMAs itself "
                f"(α = 0.99, one check per round) and calls a scalar stable when P < {self.apf_t}; under APF it reads "
                f"the controller's state. Fig. 1 shows the 2 of {sampled} randomly sampled scalars that moved most "
                f"under "
                f"FedAvg (most move far less). Under FedAvg the mean P goes from {pf[0]:.2f} (round 1) to {pf[-1]:.2f} "
                f"(round {rounds}), with {_pct(exp['stable_fraction_last'])} of the sample under T in the last "
                f"round; P near 1 means a scalar's updates keep one direction, near 0 that they cancel out "
                f"(oscillation around an optimum) — the paper's observation is that many scalars get there long "
                f"before accuracy stops rising.")
        table = _table(["layer", "scalars", "sampled", "FedAvg: first stable, median [5th, 95th] (share)",
                        "APF: first frozen, median [5th, 95th] (share)"], layer_rows)
        return self.section("stability", f"{text}\n\n{f1}\n\n{f2}\n\n**Fig. 3** — rounds per layer (of the sampled "
                                         f"scalars that did; the share that did by the last round in parentheses):\n\n"
                                         f"{table}\n\n{f3}\n")

    # ---- the gap to the paper ------------------------------------------------------------------
    def gap(self) -> str:
        exp = self.exps["gap"]
        if not exp.get("rows"):
            return self.section("gap", self.missing("gap"))
        rows = [[MODEL_NAMES[e["model"]], e["label"], str(e["rounds"]), _pct(e["paper_saving"]), _pct(e["saving"]),
                 _pts(e["gap_points"]), _pts(e["accuracy_delta"]), _pct(e["frozen_final"]),
                 _pts(e["frozen_rise_last_third"])] for e in exp["rows"]]
        table = _table(["model", "run", "rounds", "paper saving", "saving here", "gap (points)", "Δ acc (points)",
                        "frozen (final)", "frozen rise, last third (points)"], rows)
        why = ("**Why it falls short.** (1) *Length*: APF saves only what is frozen, and a scalar needs many checks of "
               "cancelling updates before P = |E|/A falls under T (α = 0.99 averages ~100 checks), and then AIMD "
               "lengthens "
               "its period by one check per stable verdict — so the frozen fraction, and with it the saving, grows "
               "through the whole run (the last column: still rising in the last third). The paper's runs reach the "
               "stationary phase; these, sized for a shared 2-core CPU, are early in it (LSTM and ResNet-18 far more "
               "so: few local steps, few rounds). (2) *Scale*: small models on small data (LeNet-5 on Fashion-MNIST, a "
               "2 × 256 LSTM on 20 roles, ResNet-18 on a 10,000-image subset) train for fewer effective epochs. "
               "(3) *Settings*: T, α, Fc and p decide when a scalar counts as stable; one "
               f"T = {self.apf_t} is used for all three models here (the paper's default 0.05 freezes less in a short "
               "run, SPEC §6). (4) *What is "
               "counted*: every byte of both directions from real encoded buffers — framing, BatchNorm buffers (sent "
               "densely every round), the mask bitmap when it changes — which no freezing removes.")
        return self.section("gap", "Against SPEC §6 (the paper: LeNet-5 63.3%, LSTM 54.7%, aggressive ResNet-18 "
                                   "53.8%, all at no accuracy loss). Savings are of total bytes (up + down); the "
                                   f"paper reports total transmission volume.\n\n{table}\n\n{why}\n\n"
                                   f"{self.closers()}\n")

    def closers(self) -> str:
        """What closes the LeNet-5 gap: longer runs, tuned settings, composition with quantisation."""
        exp, tuned = self.exps["gap"], self.d["tuned"]
        lines = []
        for c in exp["closers"]:
            if "late_saving" in c:  # the continued run
                lines.append([f"APF (T = {self.apf_t}), continued to {c['rounds']} rounds (FedAvg too)",
                              _pct(c["saving"]), _pts(c["accuracy_delta"]), _pct(c["frozen_final"]),
                              f"rounds {c['from_round']}–{c['rounds']} alone: {_pct(c['late_saving'])} saved"])
            elif "reference" in c:  # a run of the Ray Tune bench, not of this report
                lines.append([f"for reference: {c['reference']}, {c['rounds']} rounds", _pct(c["saving"]),
                              _pts(c["accuracy_delta"]), _pct(c["frozen_final"]),
                              f"not a run of this report: {Path(c['source']).name} (accuracy: mean of the "
                              f"last 10 rounds)"])
            else:
                key = c["run"]
                note = f"uplink alone {_pct(c['saving_up'])}" if key.endswith("int8") else ""
                if key == "lenet5-apf-tuned" and tuned:
                    note = f"from `{tuned['search_command']}` ({Path(tuned['file']).name})"
                lines.append([c["what"] + ("" if not key.startswith("lenet5-apf-tuned") else f": {c['label']}"),
                              _pct(c["saving"]), _pts(c["accuracy_delta"]), _pct(c["frozen_final"]), note])
        if tuned is None:
            lines.append(["APF with Ray Tune's best settings", "pending", "—", "—",
                          "the search (`tune_configs/fashion-mnist-lenet5.yaml`) has not written its result yet"])
        if not lines:
            return ""
        text = ("**What closes it** (LeNet-5, where the paper's 63.3% is the target; savings against FedAvg over the "
                "same rounds, Δ accuracy in points):\n\n"
                + _table(["change", "saving", "Δ acc (points)", "frozen (final)", "note"], lines))
        for file in exp.get("figures", []):
            text += f"\n\n{_fig(file)}"
        return text

    # ---- headline and the runs -----------------------------------------------------------------
    def headline(self) -> str:
        done = {h["model"]: h for h in self.d["headline"]}
        rows = []
        for model in MODELS:
            paper = self.paper[model]
            if model not in done:
                rows.append([MODEL_NAMES[model], _pct(paper["saving"]), "not run", "", "", "", ""])
                continue
            h = done[model]
            ps = _pct(paper["saving"]) + (f" ({_pct(paper['saving_aggressive'])})" if "saving_aggressive" in paper
                                          else "")
            rows.append([MODEL_NAMES[model], ps, f"{_pct(h['saving_apf'])} ({_pct(h['saving_aggressive'])})",
                         f"{_pts(h['accuracy_delta_apf'])} ({_pts(h['accuracy_delta_aggressive'])})", str(h["rounds"]),
                         f"{_pct(paper['time_saving'])} / {_pct(h['time_saving_apf'])} "
                         f"({_pct(h['transfer_saving_apf'])})", _acc(h["accuracy_fedavg"])])
        return ("## Headline\n\nTotal bytes (up + down) saved against FedAvg over the same rounds; aggressive APF in "
                "parentheses; Δ accuracy in percentage points against FedAvg's smoothed accuracy.\n\n"
                + _table(["model", "paper saving", "saving here: APF (aggressive)", "Δ acc (points)", "rounds",
                          "per-round time saving, paper / here (transfer only)", "FedAvg accuracy"], rows) + "\n")

    def runs_table(self) -> str:
        rows, notes = [], []
        for key, run in self.d["runs"].items():
            m = run["metrics"]
            if run["status"] != "done":
                continue
            load = m["load_mean_1min"]
            stalls = run.get("stalled_rounds")
            if stalls:
                notes.append(f"`{key}`: round{'s' if len(stalls) > 1 else ''} "
                             + ", ".join(f"{r} ({_duration(s)})" for r, s in stalls)
                             + f" against a median of {_s(run['median_round_s'])} s — without "
                             f"{'them' if len(stalls) > 1 else 'it'}, "
                             f"{_duration(m['run_wall_s'] - sum(s for _, s in stalls))}")
            rows.append([f"`{key}`", run["label"], run["dataset"], str(m["rounds"]), str(run["seed"]),
                         _duration(m["run_wall_s"]), _s(m["wall_s_per_round"]), "—" if load is None else f"{load:.1f}",
                         f"`{run['command']}`"])
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

    def head(self) -> str:
        d = self.d
        workloads = "\n".join(f"- **{MODEL_NAMES[m]}**: {w['description']}." for m, w in d["workloads"].items())
        notes = "\n".join(f"- {n}" for n in d["notes"]) or "- none"
        load = d.get("load_average") or {}
        return (f"# APF reproduction report ({d['scale']} scale)\n\n"
                f"`{d['command']}` — {d['date'][:10]}, {d['machine']['cpus']}-core "
                f"{d['machine']['cpu_model']}, niceness {d['machine']['nice']}, {d['jobs']} runs at a time. "
                + _invocation_text(d, load) +
                "Every number below is in [`reproduce.json`](reproduce.json); the "
                "paper's are SPEC §6's (Tables I–III of Chen et al., ICDCS 2021). "
                + ("**Quick scale: toy data and a few rounds — a check that the pipeline works, not evidence.** "
                   if d["scale"] == "quick" else "")
                + f"All runs: in-process backend (the Ray backend gives the same bytes and accuracy, tested), seed 0, "
                  f"APF with α = 0.99, a check every round, T = {self.apf_t}, Φ = 0.8.\n\n"
                  f"Workloads:\n\n{workloads}\n\nSubstitutions and pending items:\n\n{notes}\n")


def _against_apf(rows: list[dict[str, Any]], label: str) -> str:
    """Each run but FedAvg's and APF's set against APF's row (called ``label``), as one sentence."""
    apf = next(r for r in rows if r["key"] == "lenet5-apf")
    others = [r for r in rows if r["key"] not in ("lenet5-fedavg", "lenet5-apf")]
    return f"Against {label}: " + "; ".join(_versus(r, apf) for r in others) + "."


def _versus(row: dict[str, Any], ref: dict[str, Any]) -> str:
    """``pure additive saves 3.1 points more at -0.4 points of accuracy`` (total-bytes saving, smoothed accuracy)."""
    diff = row["saving_total"] - ref["saving_total"]
    return (f"{row['label']} saves {100 * abs(diff):.1f} points {'more' if diff >= 0 else 'less'} at "
            f"{_pts(row['accuracy_delta'] - ref['accuracy_delta'])} points of accuracy")


def _target_order(rows: list[dict[str, Any]]) -> str:
    """The runs from fewest to most bytes to the target accuracy, then those that never reached it."""
    reached = sorted((r for r in rows if r["bytes_to_target"] is not None), key=lambda r: r["bytes_to_target"])
    missed = [r["label"] for r in rows if r["bytes_to_target"] is None]
    return ("From fewest to most bytes to the target: "
            + ", ".join(f"{r['label']} {_mb(r['bytes_to_target'])} MB" for r in reached) + "."
            + (f" Never reached it: {', '.join(missed)}." if missed else ""))


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


def render(data: dict[str, Any]) -> str:
    """``report.md`` for ``data`` (``reproduce.json``'s content)."""
    md = Markdown(data)
    sections = [md.headline(), *(md.table1(m) for m in MODELS), md.gap(), md.strawmen(), md.periods(),
                md.baselines(), md.rivals(), md.threshold(), md.overhead(), md.stability(), md.runs_table()]
    return md.head() + "\n" + "\n".join(sections)

