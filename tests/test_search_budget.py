"""A search within a budget (issue 17): the constrained objective, run-equivalents, the benchmark."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from pydantic import ValidationError
from rich.console import Console

from apf_ray.metrics import read_history
from apf_ray.search_objective import (
    INFEASIBLE,
    constrained_score,
    constraint_excess,
    finished_within,
    ledger_path,
    read_ledgers,
    record_round,
    rounds_trained,
)
from apf_ray.tuning import TuneSpec, choose_best
from tests.helpers import load_script, tiny_config

REPO = Path(__file__).resolve().parent.parent
SPACE = {"strategy.options.threshold": {"loguniform": [0.05, 0.5]},
         "strategy.options.aggressive_prob": {"uniform": [0.0, 0.9]}}


def _constrained(**fields) -> TuneSpec:
    return TuneSpec.model_validate({"base": {}, "search_space": SPACE, "max_accuracy_drop": 0.01,
                                    "objective": [{"metric": "constrained_saving", "last_n": 2}], **fields})


# --------------------------------------------------------------------------- the objective


def test_every_feasible_round_outranks_every_infeasible_one_and_the_nearer_infeasible_one_ranks_higher():
    feasible = [constrained_score(s, 0.0) for s in (-0.5, 0.0, 0.63)]
    infeasible = [constrained_score(s, e) for s, e in ((0.9, 0.001), (0.9, 0.2), (0.1, 0.05))]
    assert min(feasible) > max(infeasible)
    assert feasible == [-0.5, 0.0, 0.63]  # a feasible round scores its saving
    assert constrained_score(0.9, 0.001) > constrained_score(0.1, 0.05) > constrained_score(0.9, 0.2)
    assert constrained_score(-5.0, 0.0) == INFEASIBLE  # floored: still not below an infeasible round


def test_the_accuracy_gap_compares_means_of_the_last_n_at_the_trials_own_round():
    baseline = [0.5, 0.6, 0.7, 0.8, 0.9]
    # round 3: baseline mean of rounds 2-3 is 0.65, the trial's 0.60 -> gap 0.05, 0.03 beyond a 0.02 drop
    assert constraint_excess([0.5, 0.58, 0.62], baseline, 2, 0.02) == pytest.approx(0.03)
    assert constraint_excess([0.5, 0.6, 0.7, 0.8, 0.9], baseline, 2, 0.0) == pytest.approx(0.0)
    assert constraint_excess([0.95], baseline, 10, 0.0) < 0  # one round: the means of what exists


def test_a_constrained_search_needs_its_baseline_and_judges_accuracy_itself():
    with pytest.raises(ValidationError, match="baseline: true"):
        _constrained(baseline=False)
    with pytest.raises(ValidationError, match="no accuracy objective beside it"):
        _constrained(objective=[{"metric": "constrained_saving"}, {"metric": "accuracy"}])
    with pytest.raises(ValidationError, match="max_run_equivalents"):
        TuneSpec.model_validate({"base": {}, "search_space": SPACE, "objective": [{"metric": "accuracy"}],
                                 "baseline": False, "max_run_equivalents": 4})
    assert _constrained().objective[0].mode == "max"


def test_best_of_a_constrained_search_is_the_largest_feasible_saving_and_none_when_none_is_feasible():
    spec = _constrained()

    def row(saving, accuracy, status="completed"):
        return {"status": status, "accuracy_last2": accuracy, "saving": saving,
                "constrained_saving": constrained_score(saving, 0.80 - 0.01 - accuracy)}

    rows = [row(0.7, 0.70), row(0.5, 0.795), row(0.4, 0.80), row(0.9, 0.80, "early_stopped")]
    assert choose_best(rows, spec, baseline_accuracy=0.80) == 1
    assert choose_best(rows[:1], spec, baseline_accuracy=0.80) is None  # not the most accurate infeasible one


# --------------------------------------------------------------------------- run-equivalents


def _write_ledger(output: Path, name: str, entries: list[tuple[int, float]]) -> None:
    path = ledger_path(output, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"round": r, "t": t}) + "\n" for r, t in entries))


def test_ledgers_count_every_round_trained_and_a_copied_baseline_counts_its_rounds(tmp_path):
    for r in (1, 2, 1, 2, 3):  # a trial that failed after round 2, restarted from round 0
        record_round(ledger_path(tmp_path, "t1"), r)
    assert [r for r, _ in read_ledgers(tmp_path)["t1"]] == [1, 2, 1, 2, 3]
    assert rounds_trained(tmp_path, baseline_rounds=3) == {"t1": 5, "baseline": 3}


def test_what_a_search_could_choose_after_a_budget_are_the_trials_finished_by_then(tmp_path):
    # 4-round runs, baseline 4 rounds (1 run-equivalent); a and b run side by side, c after a
    _write_ledger(tmp_path, "a", [(1, 1), (2, 3), (3, 5), (4, 7)])
    _write_ledger(tmp_path, "b", [(1, 2), (2, 4), (3, 6), (4, 8.5)])
    _write_ledger(tmp_path, "c", [(1, 9), (2, 10)])
    ledgers = read_ledgers(tmp_path)
    assert finished_within(1.0, ledgers, 4, 4) == set()  # the baseline alone
    assert finished_within(2.75, ledgers, 4, 4) == {"a"}  # 7 rounds: a's 4th (t=7) is the 7th round trained
    assert finished_within(3.0, ledgers, 4, 4) == {"a", "b"}
    assert finished_within(8.0, ledgers, 4, 4) == {"a", "b"}  # c never finished


# --------------------------------------------------------------------------- the constraint reaches TPE


def test_the_accuracy_constraint_reaches_optunas_sampler_and_survives_tunes_pickling():
    from actors.constrained_search import ConstrainedOptunaSearch
    from actors.tune import _param_space, _search_algorithm

    spec = _constrained(search={"algorithm": "optuna", "seed": 1})
    searcher = _search_algorithm(spec)
    assert isinstance(searcher, ConstrainedOptunaSearch)
    assert searcher.set_search_properties(None, None, _param_space(spec))
    excesses = [0.05, -0.01, 0.2, -0.002]
    for i, excess in enumerate(excesses):
        assert searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"constrained_saving": constrained_score(0.5, excess),
                                             "accuracy_excess": excess})
    assert searcher.suggest("t4")
    searcher.on_trial_complete("t4", None, error=True)
    trials = searcher._ot_study.trials
    assert [t.constraints for t in trials[:4]] == [{"accuracy_excess": e} for e in excesses]
    assert trials[4].constraints == {}  # errored: told as failed, no constraint
    restored = pickle.loads(pickle.dumps(searcher))
    assert restored.suggest("t5") == searcher.suggest("t5")


def test_a_budget_of_few_trials_can_shorten_tpes_random_start_and_nsga2s_generation():
    from actors.tune import _search_algorithm

    tpe = _search_algorithm(_constrained(search={"algorithm": "optuna", "startup_trials": 3}))
    nsga2 = _search_algorithm(TuneSpec.model_validate({
        "base": {}, "search_space": SPACE, "objective": [{"metric": "accuracy"}, {"metric": "bytes_total"}],
        "search": {"algorithm": "optuna_nsga2", "population": 4}}))
    assert tpe._sampler._n_startup_trials == 3 and nsga2._sampler._population_size == 4
    assert _search_algorithm(_constrained(search={"algorithm": "optuna"}))._sampler._n_startup_trials == 10


# --------------------------------------------------------------------------- a real search in a budget


@pytest.mark.timeout(900)
def test_a_budgeted_asha_search_on_the_constrained_objective_counts_every_round_it_trained(local_ray, tmp_path):
    from actors.tune import run_search

    rounds, budget = 4, 6.0
    base = tiny_config("cluster.pools=[{name: cpu, num_actors: 1, num_cpus: 1}]", "output.checkpoint_every=2",
                       rounds=rounds)
    # One trial at a time: ASHA's cuts depend on the order results reach a rung, so concurrent trials
    # would make which (if any) it stops a race.
    spec = _constrained(max_accuracy_drop=0.05, num_samples=20, max_concurrent_trials=1, max_run_equivalents=budget,
                        scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2}, trial_backend="inprocess")
    summary = run_search(spec, base, tmp_path, console=Console(file=io.StringIO()))
    rows = pq.read_table(tmp_path / "trials.parquet").to_pylist()
    trials = [r for r in rows if not r["baseline"]]
    ledgers = read_ledgers(tmp_path)
    trained_at = sorted(t for lines in ledgers.values() for _, t in lines)

    def spent_by(t: float) -> int:  # rounds trained, the baseline's included, up to time t
        return sum(1 for u in trained_at if u <= t)

    # one trial at a time: no trial trained a round while another was between its first and last
    spans = sorted((lines[0][1], lines[-1][1]) for lines in ledgers.values())
    assert all(end < start for (_, end), (start, _) in pairwise(spans))
    # ASHA stopped some while the budget still had rounds left (the budget stops only the last ones).
    # Its rung is round 2: after round 1 APF has frozen nothing yet, so trials tie there and ASHA cuts none
    assert any(r["status"] == "early_stopped" and r["rounds"] < rounds
               and spent_by(ledgers[r["trial_id"]][-1][1]) < budget * rounds for r in trials)
    for r in rows:  # stopped ones included: what each trained is in its row
        assert r["rounds_trained"] == len(ledgers["baseline" if r["baseline"] else r["trial_id"]]) >= r["rounds"]
    assert summary["rounds_trained"] == sum(r["rounds_trained"] for r in rows)
    assert summary["run_equivalents"] == pytest.approx(summary["rounds_trained"] / rounds)
    # the budget ended the search (20 samples would be 21 runs); running trials finish at most their round
    assert budget <= summary["run_equivalents"] <= budget + 2 / rounds and len(trials) < 20
    best = [r for r in trials if r["best"]]
    baseline = next(r for r in rows if r["baseline"])
    for r in best:  # best.yaml is a feasible setting, chosen by its saving
        assert r["accuracy_last2"] >= baseline["accuracy_last2"] - 0.05
        assert r["constrained_saving"] == pytest.approx(r["saving"])
    assert (tmp_path / "best.yaml").is_file() == bool(best)


# --------------------------------------------------------------------------- the benchmark


def test_every_search_of_the_benchmark_starts_with_the_same_budget_space_and_accuracy_rule():
    bench = load_script(REPO / "bench" / "search_budget.py")
    for algorithm in bench.ALGORITHMS:
        spec = bench.search_spec(algorithm, 1, 300)
        spec.check_new_search()  # PBT keeps its whole population (no trials-at-once cap below it)
        assert spec.max_run_equivalents == 8 and spec.max_accuracy_drop == 0.005 and spec.baseline
        assert {k: d.model_dump(mode="json", exclude_none=True) for k, d in spec.search_space.items()} == bench.SPACE


def test_the_benchmark_refuses_a_stored_search_or_baseline_of_another_space_or_workload(tmp_path):
    from apf_ray.errors import SetupError
    from apf_ray.tuning import baseline_config

    bench = load_script(REPO / "bench" / "search_budget.py")
    base = bench.workload("quick")
    spec = bench.search_spec("random", 0, base.train.rounds).model_dump(mode="json")
    older = {**spec, "search_space": {k: v for k, v in spec["search_space"].items()
                                      if k != "strategy.options.period_policy"}}
    folder = tmp_path / "random-seed0"
    folder.mkdir()
    (folder / "search.json").write_text(json.dumps({"spec": older, "base": base.to_dict()}))
    (folder / "summary.json").write_text("{}")  # finished: it would be reused as it is
    with pytest.raises(SetupError, match=r"random-seed0/search\.json holds another benchmark's search or "
                                         r"baseline \(spec\.search_space\.strategy\.options\.period_policy differs\)"):
        bench.run_one("random", 0, base, folder, tmp_path / "shared-baseline")
    shared = tmp_path / "shared-baseline"
    shared.mkdir()
    (shared / "summary.json").write_text("{}")
    other = baseline_config(bench.build_config(base.to_dict(), {"train.local_steps": 4}))
    (shared / "config.yaml").write_text(yaml.safe_dump(other.to_dict()))
    with pytest.raises(SetupError, match=r"shared-baseline/config\.yaml .*\(train\.local_steps differs\)"):
        bench.run_one("random", 0, base, tmp_path / "random-seed1", shared)
    assert not (tmp_path / "random-seed1").exists()  # nothing copied, nothing run
    record = tmp_path / "records" / "random-seed0.json"
    bench.write_record(record, bench.TuneSpec.model_validate(older), base, {k: 0 for k in bench.RECORD_KEYS})
    with pytest.raises(SetupError, match=r"random-seed0\.json holds another benchmark's search or baseline "
                                         r"\(spec\.search_space\.strategy\.options\.period_policy differs\)"):
        bench.read_record(record, bench.search_spec("random", 0, base.train.rounds), base)
    record.write_text('{"spec": {}}')
    with pytest.raises(SetupError, match=r"random-seed0\.json is not a record of this benchmark \("):
        bench.read_record(record, bench.search_spec("random", 0, base.train.rounds), base)


@pytest.mark.timeout(1200)
def test_the_budget_benchmark_reads_a_search_as_an_anytime_curve_and_a_rerun_reuses_it(tmp_path):
    def argv(runs: str) -> list[str]:
        return [sys.executable, "bench/search_budget.py", "--quick", "--algorithms", "tpe", "--seeds", "0",
                "--output", str(tmp_path / runs), "--json", str(tmp_path / "result.json"),
                "--records", str(tmp_path / "records")]


    first = subprocess.run(argv("runs"), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    (search,) = result["searches"]
    assert search["how"] == "ran" and 8 <= search["run_equivalents"] <= 8 + 2 / 3
    assert set(search["at"]) == {"2", "4", "8"} and (tmp_path / "result.png").is_file()
    savings = [p["saving"] for p in search["curve"]]
    finished = [p["finished_trials"] for p in search["curve"]]
    assert finished == sorted(finished) and finished[0] == 0  # 1 run-equivalent is the baseline alone
    assert all(p["saving"] == 0.0 for p in search["curve"] if p["chosen"] is None)
    assert all(p["accuracy_gap"] <= 0.005 + 1e-12 for p in search["curve"] if p["chosen"] is not None)
    assert len(savings) == 29  # every quarter from 1 to 8
    ledgers = sorted((tmp_path / "runs" / "tpe-seed0" / "compute").iterdir())
    before = [p.read_text() for p in ledgers]
    record = json.loads((tmp_path / "records" / "tpe-seed0.json").read_text())
    assert record["search"]["curve"] == search["curve"] and record["spec"]["name"] == "tpe-seed0"
    assert not (tmp_path / "records" / "baseline" / "checkpoints").exists()
    assert len(read_history(tmp_path / "records" / "baseline")) == 3  # the shared baseline's history, kept
    again = subprocess.run(argv("runs"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "result.json").read_text())["searches"][0]["how"] == "reused"
    assert [p.read_text() for p in ledgers] == before  # nothing trained again
    # a fresh checkout: no runs folder, only the committed records -- the search is not run again
    fresh = subprocess.run(argv("fresh-runs"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    again_result = json.loads((tmp_path / "result.json").read_text())
    assert again_result["searches"][0]["how"] == "reused" and again_result["searches"][0]["curve"] == search["curve"]
    assert not (tmp_path / "fresh-runs" / "tpe-seed0").exists()
    assert len(read_history(tmp_path / "fresh-runs" / "shared-baseline")) == 3  # for the searches still to run
    # a partial result from the records alone: it names what has not run, and runs nothing
    partial = subprocess.run([*argv("fresh-runs"), "--recorded-only", "--algorithms", "random", "tpe"], cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert partial.returncode == 0, partial.stderr[-3000:]
    partial_result = json.loads((tmp_path / "result.json").read_text())
    assert partial_result["missing"] == ["random-seed0"]
    assert [s["algorithm"] for s in partial_result["searches"]] == ["tpe"]
    assert not (tmp_path / "fresh-runs" / "random-seed0").exists()
