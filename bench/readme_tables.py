"""Render the measured tables of the README and ``docs/`` from the result files in ``docs/results/``.

Every measured number in README.md and docs/*.md sits between a pair of marker comments,
``<!-- results:NAME -->`` … ``<!-- /results:NAME -->`` (each NAME in exactly one file); this
script rewrites what is between them from ``docs/results/*.json`` (written by the scripts in
``bench/``), with the command that made each file and the machine and load it ran on, and its
links made relative to the file they land in. A test renders them again and compares, so a hand
edit to a measured number is caught.

    python3 bench/readme_tables.py            # rewrite README.md and docs/*.md
    python3 bench/readme_tables.py --check    # exit 1 when one of them differs from the results
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"
README = REPO / "README.md"
LINK_TARGET = re.compile(r"\]\((?![a-z]+:|#)([^)\s]+)\)")  # a relative link: renderers write it from the root
BLOCK = re.compile(r"(<!-- results:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
MODEL_NAMES = {61_706: "LeNet-5", 11_173_962: "ResNet-18"}
# Files written before the scripts recorded their date and command: the date of their commit.
UNDATED = {"controller": "2026-11-28", "gpu_local_training": "2026-11-28", "orchestration": "2026-11-28",
           "faults": "2026-11-29"}
UNRECORDED_COMMANDS = {"faults": "PYTHONPATH=. python3 bench/faults.py"}  # files from before commands were recorded


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if "date" in data:
        data["day"] = data["date"][:10]
    elif name in UNDATED:
        data["day"] = f"{UNDATED[name]} (the day it was committed; the file records no date)"
    return data


def _link(name: str) -> str:
    return f"[`docs/results/{name}.json`](docs/results/{name}.json)"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _machine(data: dict[str, Any]) -> str:
    """``2-core Intel(R) Xeon(R) Processor, 1-minute load average 10.0 (niceness 10), 2026-11-29``."""
    m = data["machine"]
    cpus = m.get("cpus") or m.get("cpu_count")
    text = f"{cpus}-core {m['cpu_model']}" if m.get("cpu_model") else f"{cpus}-core machine"
    load = data.get("load_average")
    if load:
        text += f", 1-minute load average {load['mean_1min_during']:.1f} during the run"
        if m.get("nice"):
            text += f" (run at niceness {m['nice']})"
    return text + (f", {data['day']}" if data.get("day") else "")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _acc(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def render_install() -> str:
    data = _load("fresh_install")
    if data is None:
        return "A fresh install's duration is not measured yet (`python3 scripts/deps.py fresh`)."
    install, lane = data["install"], data["fast_lane"]
    counts = ", ".join(f"{n} {kind}" for kind, n in lane["counts"].items())
    return (f"Measured ({_link('fresh_install')}, `python3 scripts/deps.py fresh`): command 2's `pip install`, in a "
            f"new virtualenv with an empty pip cache, took **{_duration(install['wall_s'])}** for "
            f"{install['packages']} packages ({install['venv_mib'] / 1024:.1f} GiB on disk) on a "
            f"{_machine({**data, 'load_average': install['load_average']})}; the fast lane then took "
            f"**{_duration(lane['wall_s'])}** ({counts}), 1-minute load average "
            f"{lane['load_average']['mean_1min_during']:.1f}. Downloading the wheels takes longer on a slower link.")


def render_timings() -> str:
    quick, suite = _load("quickstart"), _load("test_suite")
    s = quick["summary"]
    text = (f"Measured ({_link('quickstart')}, `nice -n 10 python3 bench/readme_results.py`): `apf-ray train` "
            f"(the first command, after installing) took **{_duration(quick['wall_s'])}** (Ray start-up included; "
            f"{s['rounds']} rounds, final accuracy {s['final_accuracy']:.4f}) on a {_machine(quick)}.")
    if suite:
        counts = ", ".join(f"{n} {kind}" for kind, n in suite["counts"].items())
        text += (f" The test suite (`{suite['command']}`) took **{_duration(suite['wall_s'])}** ({counts}; "
                 f"{_link('test_suite')}) on a {_machine(suite)}.")
    else:
        text += " The test suite's duration is not measured yet (`--steps test_suite`)."
    return text + " An idle machine is faster; a busier one slower."


def _compare_table(rows: list[dict[str, Any]]) -> str:
    """``apf-ray compare``'s rows (``compare.json``): accuracy, MB each way, savings against the first row."""
    return _table(["variant", "final acc", "best acc", "uplink MB", "downlink MB", "uplink saving", "total saving",
                   "frozen (final)"],
                  [[f"`{r['variant']}`", _acc(r["final_accuracy"]), _acc(r["best_accuracy"]),
                    f"{r['bytes_up'] / 1e6:.2f}", f"{r['bytes_down'] / 1e6:.2f}",
                    "—" if i == 0 else _pct(r["uplink_saving"]), "—" if i == 0 else _pct(r["total_saving"]),
                    _pct(r["frozen_fraction_final"])] for i, r in enumerate(rows)])


def _comparison(name: str, caption: str) -> str:
    data = _load(name)
    w = data["workload"]
    return (f"`{data['command']}` ({caption}; {w['rounds']} rounds, {w['clients_per_round']} of {w['num_clients']} "
            f"clients per round, {w['shards_per_client']} label shards per client, APF T = {w['apf_threshold']}). "
            f"From {_link(name)} (`bench/readme_results.py`): {len(data['rows'])} runs in "
            f"{_duration(data['wall_s'])} on a {_machine(data)}.\n\n" + _compare_table(data["rows"]))


def render_rivals() -> str:
    """APF against FedAvg, FedProx and GWPF (``bench/rivals.py``)."""
    data = _load("rivals")
    if data is None:
        return "*Not measured yet*: `nice -n 10 python3 bench/rivals.py` writes `docs/results/rivals.json`."
    where = "in-process" if data["backend"] == "inprocess" else data["backend"]
    return (f"`{data['compare']}` ({where}; {_link('rivals')}, `{data['command']}`): "
            f"{len(data['rows'])} runs in {_duration(data['wall_s'])} on a {_machine(data)}. MB = 10⁶ wire "
            f"bytes; savings against FedAvg.\n\n" + _compare_table(data["rows"]))


def render_default_compare() -> str:
    return _comparison("default_compare", "Ray, a local cluster with 2 client actors")


def render_all_strategies() -> str:
    text = _comparison("all_strategies", "in-process; a Ray run gives the same numbers")
    by = {r["variant"]: r for r in _load("all_strategies")["rows"]}
    fed = by["fedavg"]["final_accuracy"]
    drops = ", ".join(f"`{v}` {100 * (by[v]['final_accuracy'] - fed):+.1f}"
                      for v in by if v.startswith(("partial_sync", "permanent")))
    ray = {r["variant"]: r for r in _load("default_compare")["rows"]}
    keys = ("bytes_up", "bytes_down", "final_accuracy", "best_accuracy", "frozen_fraction_final")
    common = [v for v in ray if v in by]
    agree = all(by[v][k] == ray[v][k] for v in common for k in keys)
    both = " and ".join(f"`{v}`" for v in common)
    return text + (f"\n\nFinal accuracy against FedAvg's, in points: {drops}. The strawmen run at APF's T = 0.2 "
                   f"(their own default is 0.05). "
                   + (f"{both} equal the default comparison's Ray runs to the byte and in accuracy." if agree else
                      f"{both} differ from the default comparison's Ray runs — the backends should agree: a bug."))


def render_controller() -> str:
    data = _load("controller")
    rows = []
    for r in data["results"]:
        n, t = r["num_params"], r["update_seconds_median"]
        size = f"{n:,}" + (f" ({MODEL_NAMES[n]})" if n in MODEL_NAMES else "")
        update = f"{t * 1e3:.1f} ms" if t < 0.01 else f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.2f} s"
        rows.append([size, update, f"{r['update_ns_per_param']:.1f}", f"{r['state_bytes_per_param']:.1f}",
                     f"{r['peak_extra_traced_bytes_per_param']:.1f}"])
    return (f"`{data.get('command', 'python3 bench/controller.py')}` ({_link('controller')}): medians of "
            f"{data['repeat']} calls on a {_machine(data)}.\n\n"
            + _table(["parameters", "update", "ns / parameter", "state B / parameter", "peak extra B / parameter"],
                     rows))


def render_gpu_local_training() -> str:
    data = _load("gpu_local_training")
    m = data["machine"]
    rows = [[{"lenet5": "LeNet-5", "resnet18": "ResNet-18"}.get(r["model"], r["model"]),
             "CPU" if r["device"] == "cpu" else m["gpu"].removeprefix("NVIDIA "), f"{r['ms_per_step']:.1f}",
             "bit-identical" if r["frozen_bit_identical"] else "**moved**"] for r in data["results"]]
    steps, batch = data["results"][0]["steps"], data["results"][0]["batch"]
    return (f"`{data.get('command', 'python3 bench/gpu_local_training.py')}` ({_link('gpu_local_training')}): "
            f"{steps} steps of batch {batch}, on a lent {m['gpu']} (torch {m['torch']}, Python {m['python']}, "
            f"CPU side {m['cpu_threads']} thread), {data['day']}; no GPU was available to re-run it since.\n\n"
            + _table(["model", "device", "ms / step", "frozen scalars after the round"], rows))


def render_orchestration() -> str:
    data = _load("orchestration")
    setup = data["setup"]
    rows, overheads, inflation, actor_mb, system_mb = [], [], [], [], []
    for r in data["results"]:
        ray, local, mem = r["ray"], r["inprocess"], r["ray"]["memory"]
        overheads.append(ray["median_wall_over_ideal"])
        inflation.append(ray["median_serial_compute_s"] / local["median_serial_compute_s"])
        actor_mb += mem["client_actor_peak_rss_mb"]
        system_mb.append(mem["peak_rss_mb_by_kind"].get("ray_system", 0.0))
        rows.append([str(r["clients_per_round"]), f"{ray['median_wall_s']:.3f}",
                     f"{ray['median_serial_compute_s']:.3f}", f"{ray['median_ideal_parallel_s']:.3f}",
                     f"{ray['median_wall_over_ideal']:.2f}",
                     f"{local['median_wall_s']:.3f}", f"{r['inprocess_over_ray_wall']:.2f}×",
                     f"{mem['peak_total_rss_mb']:.0f}", f"{max(mem['client_actor_peak_rss_mb']):.0f}",
                     f"{max(mem['server_actor_peak_rss_mb']):.0f}", str(mem["object_store_peak_mib"])])
    caption = (f"`{data.get('command', 'python3 bench/orchestration.py')}` ({_link('orchestration')}): LeNet-5 on "
               f"digits, all clients sampled every round, {setup['local_steps']} local steps of batch "
               f"{setup['batch_size']}, APF; one local Ray cluster with {setup['client_actors']} client actors "
               f"({setup['cpus_per_actor']:g} CPU, {setup['torch_threads_per_actor']} torch thread each); medians over "
               f"rounds {setup['warmup_rounds'] + 1}–{setup['rounds']}, on a {_machine(data)}")
    if "load_average" not in data:
        caption += f", load average {data['machine']['load_average_start'][0]:.1f} at the start"
    notes = (f"Orchestration costs {100 * (min(overheads) - 1):.0f}–{100 * (max(overheads) - 1):.0f}% over perfectly "
             f"parallel compute; per-client compute inside the actors is {min(inflation):.1f}–{max(inflation):.1f}× "
             f"the in-process figure (busy actors, the server and Ray's own processes share the cores). Ray's own "
             f"processes peak at {max(system_mb):.0f} MB RSS; each client actor at {min(actor_mb):.0f}–"
             f"{max(actor_mb):.0f} MB, however many virtual clients it hosts.")
    return (caption + ".\n\n"
            + _table(["clients / round", "Ray round s", "serial compute s", "ideal s", "overhead",
                      "in-process round s", "Ray speed-up", "peak RSS MB (all processes)", "per client actor MB",
                      "server actor MB", "object store MiB"], rows)
            + "\n\n" + notes)


def fault_table(rows: list[dict[str, Any]], rounds: int, fault_prob: float) -> str:
    """``bench/faults.py``'s injected faults, one row per case."""
    out = [f"| fault ({rounds} rounds, p = {fault_prob} unless noted) | final acc | Δ acc (points) | "
           "uploads rejected | clients dropped | rounds not aggregated | model finite | example message |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        msg = r["example_message"].replace("|", "\\|")
        out.append(f"| {r['case']} | {r['final_accuracy']:.3f} | {r['accuracy_change_points']:+.1f} | "
                   f"{r['uploads_rejected']} | {r['clients_dropped']} | {r['rounds_not_aggregated']} | "
                   f"{'yes' if r['model_finite'] else 'no'} | {msg[:90]} |")
    return "\n".join(out)


def input_table(rows: list[dict[str, Any]]) -> str:
    """``bench/faults.py``'s bad inputs and stops of the CLI on Ray, one row per case."""
    out = ["| input (apf-ray train on Ray) | exit | s to exit (CPU s) | run folder | rounds lost | what it printed |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        lost = r.get("rounds_lost", "—")
        msg = r["message"].replace("|", "\\|")
        folder = r["run_folder"].replace("|", "\\|")
        out.append(f"| {r['case']} | {r['exit']} | {r['seconds']} ({r['cpu_s']}) | {folder} | {lost} | "
                   f"{msg} |")
    return "\n".join(out)


def edge_table(rows: list[dict[str, Any]]) -> str:
    """``bench/edges.py``'s edge cases, one row per case: what the user did and what apf-ray did."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|")

    table = []
    for r in rows:
        seconds = f"{r['after_signal_s']} after the signal" if r.get("after_signal_s") is not None else r["seconds"]
        leftover = f"; **{r['leftover_processes']} processes outlived it**" if r.get("leftover_processes") else ""
        code = r["exit"]
        exit_text = f"killed by {signal.Signals(-code).name}" if isinstance(code, int) and code < 0 else str(code)
        table.append([cell(r["when"]), f"`{cell(r['command'])}`", exit_text, str(seconds), cell(r["said"]),
                      cell(r["found"]) + leftover])
    return _table(["when…", "command", "exit", "seconds", "what it printed", "what it left"], table)


def render_edges() -> str:
    """What a newcomer's edge cases do, from ``bench/edges.py``."""
    data = _load("edges")
    if data is None:
        return "*Not measured yet*: `python3 bench/edges.py` writes `docs/results/edges.json`."
    first, *again = data.get("invocations") or [data]
    reruns = "".join(f", then `{i['command']}` ({i['code']})" for i in again)
    return (f"`{first['command']}` ({_link('edges')}; {first['code']}{reruns}; each case a real `apf-ray` command "
            f"in a temporary folder `$TMP`, `$TMP/tiny.yaml` the default workload cut to 6 clients and rounds of "
            f"about a second; on a {_machine(data)}):\n\n" + edge_table(data["rows"]))


def render_tune_fashion_mnist() -> str:
    """Ray Tune's best APF settings against the paper's defaults and FedAvg (``bench/tune_fashion_mnist.py``)."""
    data = _load("tune_fashion_mnist")
    if data is None:
        return ("*Not measured yet*: `python3 bench/tune_fashion_mnist.py` writes "
                "`docs/results/tune_fashion_mnist.json`.")
    runs = {r["run"]: r for r in data["runs"]}
    base = runs["FedAvg"]
    rows = []
    for r in data["runs"]:
        settings = ", ".join(f"{_SYMBOLS.get(k, k)} = {_value(v)}"
                             for k, v in r["settings"].items())
        up = None if r is base else 1 - r["bytes_up"] / base["bytes_up"]
        rows.append([r["run"], settings, str(r["rounds"]), _acc(r["accuracy_last10"]),
                     f"{100 * (r['accuracy_last10'] - base['accuracy_last10']):+.1f}" if r is not base else "—",
                     f"{r['bytes_total'] / 1e6:,.1f}", _pct(r["saving_total"]), _pct(up),
                     _pct(r["frozen_fraction_final"])])
    took = _duration(data["search_time_s"])
    if "--resume" in data["command"]:  # a killed invocation's time is not recorded (bench/tune_fashion_mnist.py)
        took += (f" in {len(data['search_invocations_s'])} timed invocation(s) — it was resumed with `--resume`, "
                 "and the interrupted invocation it continued is not timed")
    text = (f"`{data['command']}` ({_link('tune_fashion_mnist')}; the search: `{data['search_command']}`, "
            f"{len(data['trials']) - 1} trials and the FedAvg baseline, {took}; then "
            f"`{data['defaults_command']}`) on a {_machine(data)}:\n\n")
    text += _table(["run", "settings", "rounds", "accuracy (last 10)", "Δ acc (points)", "MB up + down",
                    "saving (total)", "saving (uplink)", "frozen at the end"], rows)
    text += ("\n\nThe search's Pareto front (accuracy against total bytes; every trial, the front and the "
             "baseline): [`docs/results/tune_fashion_mnist_pareto.png`](docs/results/tune_fashion_mnist_pareto.png).")
    return text


def render_search_budget() -> str:
    """Which search finds the savings within 8 run-equivalents (``bench/search_budget.py``)."""
    data = _load("search_budget")
    if data is None:
        return ("*Not measured yet*: `nice -n 10 python3 bench/search_budget.py` writes "
                "`docs/results/search_budget.json` and its plot (hours on 2 cores; rerunning it continues).")
    budgets = list(data["searches"][0]["at"])
    rows = []
    for s in data["searches"]:
        statuses = s["statuses"]
        rows.append([s["algorithm"], str(s["seed"]), *(_pct(s["at"][b]["saving"]) for b in budgets),
                     f"{s['run_equivalents']:.2f}",
                     f"{s['trials']} ({statuses['completed']} / {statuses['early_stopped']} / {statuses['errored']})",
                     _duration(s["search_time_s"])])
    text = (f"`{data['command']}` ({_link('search_budget')}; {data['started'][:16].replace('T', ' ')} to "
            f"{data['finished'][:16].replace('T', ' ')} "
            f"UTC) on a {_machine(data)}. {data['what'][0].upper()}{data['what'][1:]}:\n\n")
    text += _table(["search", "seed", *(f"saving chosen at {b}" for b in budgets), "run-equivalents spent",
                    "trials (completed / stopped early / errored)",
                    "wall time (its last sitting: a resumed search's earlier ones are not timed)"], rows)
    means = [[algorithm, *(_pct(by_budget[b]) for b in budgets)]
             for algorithm, by_budget in data["mean_saving_chosen"].items()]
    text += "\n\nMean over the searcher seeds:\n\n" + _table(["search", *(f"at {b}" for b in budgets)], means)
    if data.get("missing"):
        text += (f"\n\n**Partial**: {len(data['missing'])} of the benchmark's searches have not run yet "
                 f"({', '.join(data['missing'])}); the means are over the searches above.")
    text += ("\n\nThe saving chosen against compute, every search: "
             "[`docs/results/search_budget.png`](docs/results/search_budget.png).")
    return text


def _value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


_SYMBOLS = {"threshold": "T", "alpha": "α", "check_every": "Fc", "aggressive_prob": "p", "strategy": "strategy"}


def render_vs_flower() -> str:
    """apf-ray (FedAvg and APF) against Flower on one workload, from ``bench/vs_flower.py``."""
    data = _load("vs_flower")
    st, rows = data["setup"], []
    for row in data["summary"]:
        fl, fed, apf = row["flower"], row["fedavg"], row["apf"]

        def three(key: str, fmt: str, scale: float = 1.0, *, f=fl, a=fed, p=apf) -> str:
            return " / ".join(format(x[key] * scale, fmt) for x in (f, a, p))

        rows.append([str(row["k"]), f"{row['lower_bound_s']:.3f} / {row['side_by_side_bound_s']:.3f}",
                     " / ".join(f"{x['median_round_s']:.3f} ({x['round_over_lower_bound']:.2f}×, "
                                f"{x['round_over_side_by_side_bound']:.2f}×)" for x in (fl, fed, apf)),
                     f"**{row['fedavg_over_flower']['round_s']:.2f}** / {row['apf_over_flower']['round_s']:.2f}",
                     f"{row['apf_over_fedavg']['round_s']:.2f} ({row['apf_over_fedavg']['client_compute_sum_s']:.2f})",
                     three("median_startup_s", ".1f"), three("peak_rss_mb", ".0f"),
                     three("bytes_per_round", ".0f", 1e-3)])
    agree = data["agreement"].values()
    same = all(a["same_clients_every_round"] for a in agree)
    identical = all(a["fedavg_and_flower_final_models_bit_identical"] for a in agree)
    m = data["masked_step"]
    k10 = next((r for r in data["summary"] if r["k"] == min(st["clients_per_round"])), None)
    phases = k10["fedavg"]["median_phase_s"]
    server = sum(v for k, v in phases.items() if k not in ("clients", "evaluation", "checkpoint", "metrics"))
    versions = data["versions"]["flower_side"]
    return (f"`{data['command']}` ({_link('vs_flower')}): LeNet-5 ({st['workload']['num_params']:,} parameters) on "
            f"digits upsampled to 28×28, {st['num_clients']} clients × {st['shards_per_client']} label shards, "
            f"{st['local_steps']} local SGD steps of batch {st['batch_size']} (lr {st['lr']}), "
            f"{st['client_actors']} client actors of {st['cpus_per_actor']} CPU; apf-ray "
            f"(Ray {data['machine']['ray']}) with FedAvg and with APF (T = {st['apf_threshold']}) against "
            f"Flower {versions['flwr']} (its Ray simulation, Ray {versions['ray']}, FedAvg); medians of rounds "
            f"{st['warmup_rounds'] + 1}–{st['rounds']} of {st['reps']} runs per system and K, the systems' order "
            f"rotating; on a {_machine(data)}.\n\n"
            + _table(["K", "plain-loop bound s: alone / side by side",
                      "round s (× bound alone, side by side): Flower / apf-ray FedAvg / APF",
                      "apf-ray / Flower: FedAvg / APF", "APF / FedAvg round (clients' compute)",
                      "start-up s: Flower / FedAvg / APF", "peak RSS MB: Flower / FedAvg / APF",
                      "KB / round: Flower / FedAvg / APF"], rows)
            + f"\n\nBoth systems trained the same clients every round: {'yes' if same else '**no**'}; apf-ray's "
              f"FedAvg and Flower ended with bit-identical models: {'yes' if identical else '**no**'}. The masked "
              f"local step (APF, {100 * m['frozen_fraction']:.0f}% of the scalars frozen) took "
              f"{m['masked_over_unmasked']:.3f}× the unmasked one on this workload ({m['clients']} clients' "
              f"{st['local_steps']} steps, interleaved, median). At K = {k10['k']} apf-ray's server spent "
              f"{1e3 * server:.1f} ms a round outside the clients (sampling, download accounting, decoding, "
              f"aggregation, record), {1e3 * phases.get('evaluation', 0.0):.0f} ms evaluating and "
              f"{1e3 * phases['clients']:.0f} ms waiting for the clients.")


SCALE_MODELS = {"lenet5": "LeNet-5", "resnet18": "ResNet-18"}
SCALE_UPLINKS = {"apf": "APF", "topk": "APF + Top-k 10%"}


def _scale_key(r: dict[str, Any]) -> tuple:
    return r["model"], r["num_clients"], r["clients_per_round"], r.get("uplink", "apf")


def _scale_label(r: dict[str, Any]) -> list[str]:
    return [SCALE_MODELS[r["model"]], SCALE_UPLINKS[r.get("uplink", "apf")], f"{r['num_clients']:,}",
            f"{r['clients_per_round']:,}"]


def render_scale() -> str:
    """Server scaling with virtual clients and clients per round, from ``bench/scale.py`` (after), with the
    same benchmark of the code before aggregation on the way in (``scale_before``) beside it."""
    data = _load("scale")
    cols = ("sampling", "downlink", "decode", "aggregation", "controller", "record", "checkpoint", "metrics")
    rows, skipped = [], []
    for r in data["rows"]:
        if "skipped" in r:
            skipped.append(f"{' '.join(_scale_label(r)[:2])} with {r['num_clients']:,} clients, "
                           f"{r['clients_per_round']:,} per round ({r['skipped']})")
            continue
        mem, ph = r["memory"], r["median_phase_s"]
        rows.append(_scale_label(r) + [f"{r['median_wall_s']:.2f}", f"{ph['clients']:.2f}"]
                    + [f"{1e3 * ph.get(c, 0.0):.1f}" for c in cols]
                    + [f"{r['server_work_copies']:,.0f} ({3 * r['clients_per_round'] + 30:,})",
                       f"{mem['peak_total_rss_mb']:,.0f}", f"{mem['driver_peak_rss_mb']:,.0f}",
                       f"{max(mem['server_actor_peak_rss_mb'], default=0):,.0f}",
                       f"{max(mem['client_actor_peak_rss_mb'], default=0):,.0f}", str(mem["object_store_peak_mib"])])
    text = (f"`{data['command']}` ({_link('scale')}, {data['code']}): 1 local step of batch 4 on Fashion-MNIST (IID), "
            f"2 client actors of 1 CPU, a checkpoint every round, medians of rounds 2–{data['rows'][0]['rounds']}; "
            f"on a {_machine(data)}.\n\n"
            + _table(["model", "uplink", "clients", "per round", "round s", "clients s"] + [f"{c} ms" for c in cols]
                     + ["server work, model copies (3K + 30)", "peak RSS MB (all)", "driver MB", "server actor MB",
                        "client actor MB", "object store MiB"], rows))
    if skipped:
        text += "\n\nNot run: " + "; ".join(skipped) + "."
    if data.get("goals"):
        text += "\n\nGoals: " + "; ".join(
            f"{g['goal']} ({g['row']}: {g['measured']:,}, limit {g['limit']:,}): **{'met' if g['met'] else 'not met'}**"
            for g in data["goals"]) + "."
    before = _load("scale_before")
    if before:
        after = {_scale_key(r): r for r in data["rows"]}
        compared, after_only = [], []
        for b in before["rows"]:
            a = after.get(_scale_key(b))
            if a is None or "skipped" in a:
                continue
            am = a["memory"]
            if "skipped" in b:
                after_only.append(f"{' '.join(_scale_label(a))}: before, {b['skipped']}; after, round "
                                  f"{a['median_wall_s']:.2f} s, server work {a['server_work_copies']:,.0f} model "
                                  f"copies, server actor peak {max(am['server_actor_peak_rss_mb']):,.0f} MB, all "
                                  f"processes {am['peak_total_rss_mb']:,.0f} MB")
                continue
            bm = b["memory"]
            compared.append([
                *_scale_label(b), f"{b['median_wall_s']:.2f} → {a['median_wall_s']:.2f}",
                f"{a['median_wall_s'] / b['median_wall_s']:.2f}",
                f"{b['server_work_copies']:,.0f} → {a['server_work_copies']:,.0f}",
                f"{max(bm['server_actor_peak_rss_mb']):,.0f} → {max(am['server_actor_peak_rss_mb']):,.0f}",
                f"{bm['peak_total_rss_mb']:,.0f} → {am['peak_total_rss_mb']:,.0f}"])
        if "versus" in before:  # bench/scale_versus.py: both versions in one run
            how = (f"measured side by side in the same run (`{before['command']}`, {_link('scale_before')}): each "
                   f"row by both versions in turn, each in a new process, alternating which went first; the code "
                   f"before aggregation on the way in and the client store is {before['code']}")
        else:
            how = (f"the same benchmark of the code before aggregation on the way in and the client store "
                   f"(`{before['command']}`, {_link('scale_before')}, {before['code']}; on a {_machine(before)})")
        text += (f"\n\nBefore → after, {how}; median per round:\n\n"
                 + _table(["model", "uplink", "clients", "per round", "round s", "after / before",
                           "server work, model copies", "server actor peak MB", "peak RSS MB (all)"], compared))
        if after_only:
            text += "\n\nRun after only: " + "; ".join(after_only) + "."
    return text


def render_faults() -> str:
    """Injected faults (in-process) and bad inputs / stops (the CLI on Ray), from ``bench/faults.py``."""
    data = _load("faults")
    cmd = data.get("command") or UNRECORDED_COMMANDS["faults"]
    m = data["machine"]
    where = (_machine(data) if "cpu_model" in m else
             f"{m['cpus']}-core machine, 1-minute load average {m['load_average'][0]:.1f} at the end, {data['day']}")
    return (f"`{cmd}` ({_link('faults')}; {where}):\n\n"
            + fault_table(data["faults"]["rows"], data["faults"]["rounds"], data["faults"]["probability"]) + "\n\n"
            + input_table(data["inputs"]["rows"]))


def render_reproduce() -> str:
    """The paper's experiments, from ``apf-ray reproduce``'s result file (``docs/results/reproduce/``)."""
    data = _load("reproduce/reproduce")
    link = "[`docs/results/reproduce/reproduce.json`](docs/results/reproduce/reproduce.json)"
    if data is None:
        return ("*Not measured yet*: `apf-ray reproduce --output docs/results/reproduce` writes "
                "`docs/results/reproduce/report.md` and its result file." + _reproduce_quick())
    runs = data["runs"]
    done = sum(1 for r in runs.values() if r["status"] == "done")
    names = {"lenet5": "LeNet-5", "lstm": "LSTM", "resnet18": "ResNet-18"}
    inv = data.get("invocations") or []
    main = max(inv, key=lambda i: i["wall_s"]) if inv else data  # the invocation that trained most
    took = _duration(data.get("total_wall_s") or data["wall_s"])
    pending = [e["title"] for e in data["experiments"].values() if not e["complete"]]
    status = ("has every table and plot" if not pending else
              f"has the tables and plots whose runs are done — {len(pending)} of {len(data['experiments'])} "
              f"experiments still wait for runs: {'; '.join(pending)}")
    text = (f"`{main['command']}` ({data['scale']} scale; "
            f"[the report](docs/results/reproduce/report.md) {status}; {link} has every number): "
            f"{done} runs, in-process, seed 0, {data['jobs']} at a time, {took} of training on a "
            f"{_machine(data | {'load_average': main['load_average']})}"
            + (f" ({len(inv)} invocations, the longest's load shown)" if len(inv) > 1 else "") + ".")
    rows = []
    for h in data.get("headline", []):
        paper = _pct(h["paper_saving"]) + (f" ({_pct(h['paper_saving_aggressive'])})"
                                           if h.get("paper_saving_aggressive") else "")
        rows.append([names[h["model"]], str(h["rounds"]), _acc(h["accuracy_fedavg"]),
                     f"{_pct(h['saving_apf'])} ({100 * h['accuracy_delta_apf']:+.1f})",
                     f"{_pct(h['saving_aggressive'])} ({100 * h['accuracy_delta_aggressive']:+.1f})", paper,
                     f"{_pct(h['paper_time_saving'])} / {_pct(h['time_saving_apf'])} "
                     f"({_pct(h['transfer_saving_apf'])})"])
    text += ("\n\n" + _table(["model", "rounds", "FedAvg accuracy", "APF saving (Δ acc, points)",
                               "aggressive APF saving (Δ acc)", "paper saving (aggressive)",
                               "round time saving: paper / here (transfer only)"], rows))
    exps = data["experiments"]
    closers = exps.get("gap", {}).get("closers") or []
    if closers:
        items = []
        for c in closers:
            late = f"; rounds after the first half alone: {_pct(c['late_saving'])}" if c.get("late_saving") else ""
            items.append(f"{c['what']}: {_pct(c['saving'])} ({100 * c['accuracy_delta']:+.1f} points{late})")
        pending = "" if data.get("tuned") else "; the Ray Tune setting's run is pending (its search has not finished)"
        text += "\n\nWhat closes the LeNet-5 gap: " + "; ".join(items) + pending + "."
    rows13 = exps.get("baselines", {}).get("rows") or []
    if rows13:
        target = rows13[0]["target"]
        parts = ", ".join(f"{r['label']} " + ("not reached" if r["bytes_to_target"] is None
                                               else _mb_text(r["bytes_to_target"])) for r in rows13)
        text += f" Bytes to reach accuracy {target:.3f} (Fig. 13): {parts}."
    straw = {r["key"]: r for r in exps.get("strawmen", {}).get("rows") or []}
    if straw:
        text += (" Accuracy against FedAvg (Figs. 5/6): "
                 + ", ".join(f"{straw[k]['label']} {100 * straw[k]['accuracy_delta']:+.1f} points"
                             for k in ("lenet5-apf", "lenet5-partial-sync", "lenet5-permanent") if k in straw) + ".")
    return text + _reproduce_quick()


def _reproduce_quick() -> str:
    """How long ``apf-ray reproduce --quick`` took (``docs/results/reproduce_quick.json``)."""
    quick = _load("reproduce_quick")
    if quick is None:
        return ""
    return (f"\n\n`{quick['command']}` ({_link('reproduce_quick')}): every experiment at toy scale, "
            f"{sum(1 for r in quick['runs'].values() if r['status'] == 'done')} runs in "
            f"**{_duration(quick['wall_s'])}** on a {_machine(quick)}.")


def _mb_text(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB"


RENDERERS: dict[str, Callable[[], str]] = {
    "install": render_install,
    "timings": render_timings,
    "default_compare": render_default_compare,
    "all_strategies": render_all_strategies,
    "controller": render_controller,
    "gpu_local_training": render_gpu_local_training,
    "orchestration": render_orchestration,
    "faults": render_faults,
    "edges": render_edges,
    "vs_flower": render_vs_flower,
    "scale": render_scale,
    "reproduce": render_reproduce,
    "tune_fashion_mnist": render_tune_fashion_mnist,
    "search_budget": render_search_budget,
    "rivals": render_rivals,
}


def documents() -> list[Path]:
    """The files that may hold results blocks: the README and the Markdown files of ``docs/``."""
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def _relink(text: str, folder: Path) -> str:
    """Links written from the repository root (``docs/results/x.json``), made relative to ``folder``."""
    return LINK_TARGET.sub(lambda m: f"]({Path(os.path.relpath(REPO / m.group(1), folder)).as_posix()})", text)


def render_blocks(text: str, path: Path = README) -> tuple[str, set[str]]:
    """``text`` (the file at ``path``) with every results block rendered again; and the blocks' names."""
    found: set[str] = set()

    def replace(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise KeyError(f"{path.name} block results:{name} has no renderer (known: {sorted(RENDERERS)})")
        found.add(name)
        return m.group(1) + _relink(RENDERERS[name](), path.parent) + "\n" + m.group(4)

    return BLOCK.sub(replace, text), found


def render_all(texts: dict[Path, str]) -> dict[Path, str]:
    """Every document rendered again; each renderer's block must be in exactly one of them."""
    out, where = {}, {}
    for path, text in texts.items():
        out[path], found = render_blocks(text, path)
        for name in found:
            if name in where:
                raise KeyError(f"results:{name} is in both {where[name].name} and {path.name}")
            where[name] = path
    missing = sorted(set(RENDERERS) - set(where))
    if missing:
        raise KeyError(f"no document has a block for {missing}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a document is out of date")
    args = parser.parse_args()
    texts = {path: path.read_text() for path in documents()}
    rendered = render_all(texts)
    stale = [path for path in texts if rendered[path] != texts[path]]
    names = ", ".join(path.relative_to(REPO).as_posix() for path in stale)
    if args.check:
        sys.exit(f"{names} differ from docs/results; run python3 bench/readme_tables.py" if stale else 0)
    for path in stale:
        path.write_text(rendered[path])
    print("rendered", ", ".join(RENDERERS), "into", names or "nothing (all up to date)")


if __name__ == "__main__":
    main()
