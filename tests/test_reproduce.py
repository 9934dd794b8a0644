"""`apf-ray reproduce`: the report, its plots and JSON, the stability probe, cached and continued runs.

The end-to-end test runs two experiments at quick scale (four short digits runs, two at a time in
worker processes); the others drive the pieces in this process on the tests' tiny workload.
Nothing here asserts a timing.
"""

from __future__ import annotations

import dataclasses
import json
import pkgutil
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import apf_ray
from apf_ray.cli import main
from apf_ray.metrics import read_history
from apf_ray.run import run
from apf_ray.stability_probe import StabilityProbe, read_probe
from reproduce.analysis import smoothed
from reproduce.markdown import render
from reproduce.overhead import measure_overhead
from reproduce.plan import build_plan
from reproduce.report import render_report, write_report
from reproduce.worker import main as worker_main
from tests.helpers import Crash, CrashAfter, tiny_config

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def test_quick_reproduce_writes_the_report_plots_and_json_and_reuses_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "quick"
    argv = ["reproduce", "--quick", "--only", "stability", "strawmen", "rivals", "--output", str(out), "--quiet"]
    assert main(argv) == 0

    data = json.loads((out / "reproduce.json").read_text())
    report = (out / "report.md").read_text()
    for plot in ("fig1_trajectories.png", "fig2_perturbation.png", "fig3_layers.png", "fig5_6_strawmen.png"):
        assert plot in data["plots"] and f"]({plot})" in report
        assert (out / plot).read_bytes()[:8] == PNG
    rows = {r["key"]: r for r in data["experiments"]["strawmen"]["rows"]}
    assert set(rows) == {"lenet5-fedavg", "lenet5-apf", "lenet5-partial-sync", "lenet5-permanent"}
    fedavg, apf = rows["lenet5-fedavg"], rows["lenet5-apf"]
    assert fedavg["frozen_final"] == 0 and fedavg["saving_total"] is None
    assert 0 < apf["bytes_total"] < fedavg["bytes_total"] and 0 < apf["saving_total"] < 1
    assert all(0.3 < r["accuracy_smoothed"] <= 1 and r["rounds"] == 12 for r in rows.values())
    assert rows["lenet5-permanent"]["frozen_final"] >= apf["frozen_final"]  # frozen for good never thaws

    rivals = {r["key"]: r for r in data["experiments"]["rivals"]["rows"]}  # FedProx and GWPF, alone and + Top-k
    assert list(rivals) == ["lenet5-fedavg", "lenet5-apf", "lenet5-fedprox", "lenet5-gwpf", "lenet5-apf-topk",
                            "lenet5-fedprox-topk", "lenet5-gwpf-topk"]
    assert rivals["lenet5-fedprox"]["bytes_up"] == fedavg["bytes_up"] and rivals["lenet5-fedprox"]["frozen_final"] == 0
    assert rivals["lenet5-gwpf"]["frozen_final"] > 0 and 0 < rivals["lenet5-gwpf"]["saving_total"] < 1
    for alone in ("lenet5-apf", "lenet5-fedprox", "lenet5-gwpf"):  # Top-k composed after each strategy's encoding
        assert rivals[f"{alone}-topk"]["bytes_up"] < rivals[alone]["bytes_up"] / 2
    drawn = data["figures"]["rivals_lenet5.png"]
    assert drawn["runs"] == [[r["label"], key] for key, r in rivals.items()] and drawn["target"] == fedavg["target"]
    assert "## APF against FedProx and GWPF" in report and "](rivals_lenet5.png)" in report
    assert (out / "rivals_lenet5.png").read_bytes()[:8] == PNG
    stability = data["experiments"]["stability"]
    assert stability["complete"] and len(stability["layers_apf"]) == 5  # LeNet-5's five layers
    assert all(0 <= p <= 1 for _, p in stability["p_mean_fedavg"] if p is not None)
    run_entry = data["runs"]["lenet5-apf"]
    assert run_entry["status"] == "done" and run_entry["seed"] == 0 and run_entry["rounds"] == 12
    assert run_entry["command"] == "apf-ray train --inprocess --config configs/lenet5-apf.yaml --output runs/lenet5-apf"
    assert (out / "configs" / "lenet5-apf.yaml").is_file()
    assert data["runs"]["lstm-apf"]["status"] == "not run"
    assert "## Figs. 5/6" in report and "*Not run in this output folder yet*" in report  # other experiments

    summary = out / "runs" / "lenet5-apf" / "summary.json"
    before = summary.stat().st_mtime_ns
    assert main(argv) == 0  # everything is cached: nothing retrains
    assert summary.stat().st_mtime_ns == before

    # the plots and report.md come from reproduce.json alone: made again without the runs, they are the same
    alone = tmp_path / "from-json"
    alone.mkdir()
    shutil.copy(out / "reproduce.json", alone)
    assert render_report(alone) == data["plots"]
    assert (alone / "report.md").read_text() == (out / "report.md").read_text()
    for plot in data["plots"]:
        assert (alone / plot).read_bytes() == (out / plot).read_bytes(), plot
    not_run = json.loads(json.dumps(data))  # the rivals' section without its runs says so, from the JSON alone
    not_run["experiments"]["rivals"] = {k: data["experiments"]["rivals"][k] for k in ("title", "what", "runs")}
    not_run["runs"]["lenet5-gwpf"]["status"] = "not run"
    assert (f"*Not run in this output folder yet* (missing: `lenet5-gwpf`): `apf-ray reproduce --quick --only rivals "
            f"--output {out}`") in render(not_run)
    series = data["series"]["lenet5-apf"]  # what the curves draw, per round, from the journal
    assert series["rounds"] == list(range(1, 13)) and len(series["frozen_fraction"]) == 12
    assert series["cum_bytes_total"][-1] == rows["lenet5-apf"]["bytes_total"]


def test_the_committed_report_is_what_the_current_renderer_makes_of_the_committed_reproduce_json(tmp_path) -> None:
    """docs/results/reproduce/report.md can drift from the code's prose only by being stale: rendered again from
    its reproduce.json alone, it comes out the same (its plots too, for the figures whose series the file holds)."""
    committed = REPO / "docs" / "results" / "reproduce"
    shutil.copy(committed / "reproduce.json", tmp_path)
    drawn = render_report(tmp_path)
    assert (tmp_path / "report.md").read_text() == (committed / "report.md").read_text()
    for plot in drawn:
        assert (tmp_path / plot).read_bytes() == (committed / plot).read_bytes(), plot
    assert all((committed / plot).is_file() for plot in json.loads((committed / "reproduce.json").read_text())["plots"])


def test_a_stopped_reproduce_records_its_finished_runs_and_the_next_resumes_the_one_in_flight(tmp_path: Path) -> None:
    out = tmp_path / "stopped"
    argv = [sys.executable, "-m", "apf_ray.cli", "reproduce", "--quick", "--only", "strawmen", "--jobs", "1",
            "--output", str(out), "--quiet"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:  # stop it once the first run finished and the second has checkpointed a round
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            done = [d.parent.name for d in (out / "runs").glob("*/summary.json")]
            if len(done) >= 2 and any((out / "runs" / k / "checkpoints").glob("round-*") for k in done):
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the invocation ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, err
    [entry] = json.loads((out / "runs" / "invocations.json").read_text())
    assert entry["interrupted"] and entry["wall_s"] > 0
    assert entry["trained"] and set(entry["trained"]) < {"lenet5-fedavg", "lenet5-apf", "lenet5-partial-sync",
                                                         "lenet5-permanent"}
    assert main(argv[3:]) == 0  # the next invocation finishes the rest, resuming the run in flight
    first, second = json.loads((out / "runs" / "invocations.json").read_text())
    assert not second["interrupted"] and not set(first["trained"]) & set(second["trained"])
    assert "stopped, its runs in flight resumed by the next" in (out / "report.md").read_text()


def test_unknown_experiment_names_the_choices(capsys) -> None:
    assert main(["reproduce", "--quick", "--only", "table9", "--output", "/nonexistent/x"]) == 2
    assert "unknown experiment; choose from lenet5, lstm, resnet18" in capsys.readouterr().err


def test_every_run_of_the_plan_is_a_valid_config_and_the_lenet5_workload_is_the_tune_search_s() -> None:
    quick, full = build_plan(quick=True), build_plan(quick=False)
    assert set(quick.runs) == set(full.runs) - {"lenet5-fedavg-600", "lenet5-apf-600"} | {"lenet5-fedavg-24",
                                                                                            "lenet5-apf-24"}
    assert full.tuned is not None and "lenet5-apf-tuned" in full.runs  # the committed Ray Tune result, by default
    cont = full.runs["lenet5-apf-600"]
    assert cont.extends == "lenet5-apf" and cont.rounds == 600
    assert full.runs["lenet5-partial-sync"].config["strategy"]["options"]["threshold"] == 0.2  # same T as APF
    lenet = full.runs["lenet5-fedavg"].config
    if lenet["data"]["dataset"] == "fashion_mnist":  # SPEC §6's probe, as tune_configs/fashion-mnist-lenet5.yaml
        assert (lenet["data"]["num_clients"], lenet["train"]["clients_per_round"], lenet["train"]["local_steps"],
                lenet["train"]["rounds"]) == (10, 10, 50, 300)


def test_table_iii_says_when_where_and_at_what_load_its_micro_benchmark_ran(tmp_path: Path) -> None:
    """The overhead measurement is cached and read beside runs trained another day, perhaps on another
    machine: the report names its own date, machine and load, measured by a real (quick) run of it."""
    plan = build_plan(quick=True)
    one_workload = dataclasses.replace(plan, workloads={"lenet5": plan.workloads["lenet5"]})  # keeps it short
    measured = measure_overhead(one_workload, say=lambda _: None)
    assert measured["scale"] == "quick" and measured["machine"]["cpus"] >= 1
    lenet = measured["models"]["lenet5"]
    assert lenet["num_params"] == 61706 and lenet["local_round_s_fedavg"] > 0 and lenet["local_round_s_apf"] > 0
    meta = {"command": "apf-ray reproduce --quick --only overhead", "date": measured["date"],
            "machine": measured["machine"], "wall_s": 1.0, "load_average": measured["load_average"], "jobs": 1}
    data = write_report(plan, tmp_path, statuses={}, meta=meta, overhead=measured)
    assert data["experiments"]["overhead"]["measured"]["date"] == measured["date"]
    machine, report = measured["machine"], (tmp_path / "report.md").read_text()
    assert (f"The micro-benchmark ran {measured['date'][:10]} on a {machine['cpus']}-core {machine['cpu_model']} "
            f"(mean 1-minute load {measured['load_average']['mean_1min_during']})") in report
    unrecorded = json.loads(json.dumps(data))  # a measurement cached before its provenance was recorded
    unrecorded["experiments"]["overhead"]["measured"] = {"date": None, "machine": None, "load_average": None}
    assert "at what load and with which masked step the micro-benchmark ran was not recorded" in render(unrecorded)


def test_smoothed_accuracy_is_the_trailing_mean() -> None:
    assert smoothed(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def test_a_round_far_over_its_runs_median_is_reported_as_stalled_and_slow_runs_are_not() -> None:
    from reproduce.summary import stalled_rounds

    wall = np.array([2.7, 2.8, 699.0, 2.6, 602.0, 2.9])
    assert stalled_rounds(wall, np.arange(1, 7)) == [(3, 699.0), (5, 602.0)]
    assert stalled_rounds(np.array([30.0, 31.0, 29.0, 45.0]), np.arange(1, 5)) == []  # slow, steady
    assert stalled_rounds(np.array([0.1, 0.1, 50.0]), np.arange(1, 4)) == []  # 500x, but under a minute


def test_the_probe_follows_a_sample_each_round_and_survives_a_resume(tmp_path: Path) -> None:
    from apf_ray.resume import load_resume_point

    cfg = tiny_config("output.checkpoint_every=2", "output.tensorboard=false", rounds=4)
    whole = tmp_path / "whole"
    run(cfg, whole, callbacks=[StabilityProbe(per_layer=50, trajectories=3, threshold=0.5)])
    rows, summary = read_probe(whole)
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and all(len(r["values"]) == 3 for r in rows)
    assert summary["source"] == "controller" and len(summary["layers"]) == 5
    assert all(0 < layer["sampled"] <= 50 for layer in summary["layers"])

    cut = tmp_path / "cut"
    with pytest.raises(Crash):
        run(cfg, cut, callbacks=[StabilityProbe(per_layer=50, trajectories=3, threshold=0.5), CrashAfter(3)])
    run(cfg, cut, callbacks=[StabilityProbe(per_layer=50, trajectories=3, threshold=0.5)],
        resume=load_resume_point(cut))
    assert read_probe(cut) == (rows, summary)


def test_a_continued_run_equals_the_run_trained_that_long_in_one_go(tmp_path: Path) -> None:
    def spec(key: str, rounds: int, extends: str | None = None) -> Path:
        cfg = tiny_config("output.tensorboard=false", rounds=rounds).to_dict()
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({"key": key, "config": cfg, "run_dir": str(tmp_path / key), "probe": False,
                                    "extends_dir": str(tmp_path / extends) if extends else None}))
        return path

    assert worker_main(str(spec("short", 2))) == 0
    assert worker_main(str(spec("continued", 4, extends="short"))) == 0
    assert worker_main(str(spec("straight", 4))) == 0
    continued, straight = read_history(tmp_path / "continued"), read_history(tmp_path / "straight")
    keys = ("cum_bytes_up", "cum_bytes_down", "test_accuracy", "frozen_fraction")
    assert [[getattr(r, k) for k in keys] for r in continued] == [[getattr(r, k) for k in keys] for r in straight]
    assert len(read_history(tmp_path / "short")) == 2  # the source run is left as it was
    worker = json.loads((tmp_path / "continued" / "worker.json").read_text())
    assert worker["resumed_after_round"] == 2 and worker["controller_timing"]["calls"] == 2


def test_the_library_never_imports_the_reproduction_and_the_distribution_ships_both() -> None:
    """The paper's reproduction is a package beside ``apf_ray`` (issue 15): importing every library module
    loads none of it, and pyproject's package discovery still puts it in the wheel and the editable install."""
    from setuptools import find_namespace_packages  # what pyproject's `packages.find` uses (namespaces = true)

    modules = [m.name for m in pkgutil.walk_packages(apf_ray.__path__, "apf_ray.")]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'reproduce' or m.startswith('reproduce.')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    include = re.search(r"^\[tool\.setuptools\.packages\.find\]\ninclude = (\[.*\])$",
                        (REPO / "pyproject.toml").read_text(), re.M)
    shipped = set(find_namespace_packages(str(REPO), include=json.loads(include.group(1))))
    assert {"apf_ray", "actors", "reproduce"} <= shipped
    assert not any(p.startswith(("tests", "bench", "scripts")) for p in shipped)
