"""Which search finds APF's savings within a budget: five searchers, each capped at 8 run-equivalents.

For each algorithm — random search, NSGA-II (accuracy against bytes), a constraint-aware TPE,
ASHA and PBT (all but NSGA-II on the constrained objective, see
``apf_ray/search_objective.py``) — and each of 2
searcher seeds, one ``apf-ray tune`` search over APF's T, α, Fc, p and freezing-period policy
(AIMD or multiplicative, SPEC §2) on the paper's LeNet-5
setting (Fashion-MNIST, 10 clients × 2 label shards, 300 rounds), stopped once it trained 8
run-equivalents *including* its FedAvg baseline. The baseline is trained once (by the first
search) and copied into the others: same workload, same seed, same numbers.

Each search is then read as an anytime curve: after b run-equivalents (b = 2, 4, 8 in the
table; every quarter in the plot), the trials that had finished all their rounds by then are
the ones the search could have chosen from; the one best.yaml's rule chooses (the largest
saving within 0.5 points of FedAvg, accuracies as means of the last 10 rounds) gives the
curve's value, its total-bytes saving — 0 when the search could choose no feasible setting yet.

    nice -n 10 python3 bench/search_budget.py [--output runs/search-budget] [--json PATH]
    nice -n 10 python3 bench/search_budget.py --quick   # digits, 3 rounds, one seed: a smoke test

Rerunning the same command continues: finished searches are reused, an interrupted one is
resumed (``apf-ray tune --resume``), the rest run. Each finished search leaves a record (its curve and
counts) in ``docs/results/search_budget/``, and the shared baseline its history there: they are
committed as they come, so the benchmark (~5 h on an idle 2-core machine, about half an hour a search,
much longer beside other work) continues over several sittings, and on a
fresh checkout from them without its ``runs/`` folder. Needs Debian's ``dataset-fashion-mnist``
(not ``--quick``). Long: 10 searches × 8 runs of 300 rounds; each search shows its trials as they
run, as ``apf-ray tune`` does (a live table, or a line per finished trial in a log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from provenance import RESULTS, code, command, machine

from apf_ray.config import ConfigError, ExperimentConfig, build_config, read_yaml_mapping
from apf_ray.errors import SetupError, Stopped
from apf_ray.metrics import read_history, write_json
from apf_ray.resume import config_changes
from apf_ray.search_objective import finished_within, read_ledgers
from apf_ray.tuning import TuneSpec, accuracy_key, baseline_config, choose_best

REPO = RESULTS.parent.parent
ALGORITHMS = ("random", "nsga2", "tpe", "asha", "pbt")
BUDGET = 8.0
"""Run-equivalents per search, the baseline's included."""
READ_AT = (2.0, 4.0, 8.0)
MAX_DROP = 0.005
"""Accuracy (fraction) a chosen setting may lose against FedAvg: 0.5 points."""
LAST_N = 10
SPACE = {
    "strategy.options.threshold": {"loguniform": [0.05, 0.5]},
    "strategy.options.alpha": {"uniform": [0.9, 0.995]},
    "strategy.options.check_every": {"choice": [1, 2, 5]},
    "strategy.options.aggressive_prob": {"uniform": [0.0, 0.5]},
    "strategy.options.period_policy": {"choice": ["aimd", "multiplicative"]},
}
"""APF's own knobs. Under AIMD a stable scalar's freezing period grows by one check at a time, so on
this non-IID split the frozen fraction was still climbing at round 300 and no setting of the other
four saved more than ~55% within 0.5 points (two searches of the earlier space); a doubling period
freezes stable scalars for most of the run sooner."""
SCALES = {
    "paper": {"config": "configs/fashion-mnist-lenet5.yaml", "overrides": {}, "output": "runs/search-budget",
              "json": RESULTS / "search_budget.json", "records": RESULTS / "search_budget"},
    "quick": {"config": "configs/digits-lenet5.yaml",
              "overrides": {"train.rounds": 3, "data.num_clients": 6, "train.clients_per_round": 3,
                            "train.local_steps": 3},
              "output": "runs/search-budget-quick", "json": RESULTS / "search_budget_quick.json",
              "records": None},  # None: beside the searches, in <output>/records (a smoke test commits none)
}
POPULATION = 6
"""PBT's population: it trains every member to the end, so 6 runs + the baseline fit in 8."""
GENERATION = 3
"""TPE's random start-up trials and NSGA-II's generation: about 7 whole trials fit the budget, so
Optuna's defaults (10 and 50) would leave both searchers random search with another seed."""


def search_spec(algorithm: str, seed: int, rounds: int) -> TuneSpec:
    """One search of the benchmark: every algorithm shares the space, budget and accuracy rule."""
    constrained = [{"metric": "constrained_saving", "last_n": LAST_N}]
    step = max(1, rounds // 10)  # ASHA's first rung and PBT's perturbation interval: a tenth of a run
    per_algorithm: dict[str, dict[str, Any]] = {
        "random": {"objective": constrained, "search": {"algorithm": "random", "seed": seed}},
        "nsga2": {"objective": [{"metric": "accuracy", "last_n": LAST_N}, {"metric": "bytes_total"}],
                  "search": {"algorithm": "optuna_nsga2", "seed": seed, "population": GENERATION}},
        "tpe": {"objective": constrained, "search": {"algorithm": "optuna", "seed": seed,
                                                     "startup_trials": GENERATION}},
        "asha": {"objective": constrained, "search": {"algorithm": "random", "seed": seed},
                 "scheduler": {"name": "asha", "grace_period": step, "reduction_factor": 3}},
        "pbt": {"objective": constrained, "search": {"algorithm": "random", "seed": seed}, "num_samples": POPULATION,
                "max_concurrent_trials": None,  # the whole population; two at a time is what 2 CPUs fit
                "scheduler": {"name": "pbt", "perturbation_interval": step, "synch": False}},
    }
    return TuneSpec.model_validate({
        "name": f"{algorithm}-seed{seed}", "base": {}, "search_space": SPACE, "max_accuracy_drop": MAX_DROP,
        "max_run_equivalents": BUDGET, "max_concurrent_trials": 2, "num_samples": 64,
        "trial_backend": "inprocess",  # one process per trial, no client actor: same numbers, less overhead
        **per_algorithm[algorithm]})


def workload(scale: str) -> ExperimentConfig:
    """The base train config: one pool of one actor, the client grouping each in-process trial reproduces
    (two trials at a time on 2 cores)."""
    setting = SCALES[scale]
    raw = read_yaml_mapping(REPO / setting["config"])
    overrides = {"cluster.pools": [{"name": "cpu", "num_actors": 1, "num_cpus": 1}],
                 "output.checkpoint_every": 50, **setting["overrides"]}
    return build_config(raw, overrides, source=setting["config"])


def run_one(algorithm: str, seed: int, base: ExperimentConfig, output: Path, shared_baseline: Path) -> str:
    """Run, resume or reuse one search in ``output``; says which it did. A stored search or baseline
    of another spec or workload (an earlier version of this benchmark) is refused, never mixed in."""
    from actors.tune import read_search_record, resume_search, run_search

    spec = search_spec(algorithm, seed, base.train.rounds)
    if (output / "search.json").is_file():
        stored_spec, stored_base = read_search_record(output)  # both filled in by this version's models
        refuse_another(output / "search.json", differences(stored_spec, stored_base.to_dict(), spec, base))
        if (output / "summary.json").is_file():
            return "reused"
        resume_search(output)
        return "resumed"
    if (shared_baseline / "summary.json").is_file():  # trained by an earlier search: same workload, same seed
        config = shared_baseline / "config.yaml"
        changes = config_changes(read_yaml_mapping(config), baseline_config(base))  # normalised, as on resume
        refuse_another(config, [field for field, _, _ in changes])
        shutil.copytree(shared_baseline, output / "baseline")
    run_search(spec, base, output)  # its live table, or a line per finished trial in a log
    return "ran"


def differences(stored_spec: TuneSpec, stored_base: dict[str, Any], spec: TuneSpec,
                base: ExperimentConfig) -> list[str]:
    """Where a stored search (its spec, and its workload as a mapping) differs from this benchmark's:
    ``spec.<field>`` or ``base.<field>``, after both are filled in by this version's models."""
    spec_changes = _differences(stored_spec.model_dump(mode="json"), spec.model_dump(mode="json"))
    return ([f"spec.{field}" for field in spec_changes]
            + [f"base.{field}" for field, _, _ in config_changes(stored_base, base)])


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths where two JSON values differ; a key one side lacks is named whole."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [f for key in sorted(set(old) | set(new))
                for f in _differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)]
    return [] if old == new else [where]


def refuse_another(path: Path, differing: list[str]) -> None:
    """SetupError naming ``path`` and the first field where it differs from this benchmark's search."""
    if differing:
        raise SetupError(f"{path} holds another benchmark's search or baseline ({differing[0]} differs): "
                         "give --output a new folder, or move that one away")


RECORD_KEYS = ("started", "finished", "run_equivalents", "trials", "statuses", "search_time_s", "at", "curve")
"""What a search's record keeps of it: everything the result file and the plot are drawn from."""


def when_it_ran(summary: Path, seconds: float) -> dict[str, str]:
    """A finished search's start and end (UTC, ISO 8601): its summary's time of writing, less its wall time."""
    ended = datetime.fromtimestamp(summary.stat().st_mtime, UTC)
    return {"started": (ended - timedelta(seconds=seconds)).isoformat(timespec="seconds"),
            "finished": ended.isoformat(timespec="seconds")}


def write_record(path: Path, spec: TuneSpec, base: ExperimentConfig, search: dict[str, Any]) -> None:
    """Keep a finished search's curve and counts (a few kB) with what it was and where it ran."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"spec": spec.model_dump(mode="json"), "base": base.to_dict(), "code": code(),
                      "machine": machine(), "search": {k: search[k] for k in RECORD_KEYS}})


def read_record(path: Path, spec: TuneSpec, base: ExperimentConfig) -> dict[str, Any]:
    """A finished search's record: SetupError if it is damaged, or holds another spec or workload
    (an earlier version of this benchmark), never read as this one's."""
    try:
        record = json.loads(path.read_text())
        stored_spec, stored_base = TuneSpec.model_validate(record["spec"]), record["base"]
        search = {k: record["search"][k] for k in RECORD_KEYS}
    except (ValueError, KeyError, TypeError) as err:  # pydantic's ValidationError is a ValueError
        raise SetupError(f"{path} is not a record of this benchmark ({type(err).__name__}): move it away "
                         "to run that search again") from None
    refuse_another(path, differences(stored_spec, stored_base, spec, base))
    return search


def keep_baseline(run_dir: Path, kept: Path) -> None:
    """The baseline's history and tables (about 1 MB for 300 rounds), without its checkpoints: a search
    only reads a finished baseline's history."""
    tmp = kept.with_name(f".{kept.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a copy an earlier stop left half-made: ours (the dot name)
    shutil.copytree(run_dir, tmp, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "client_state"))
    tmp.replace(kept)


def anytime(output: Path, rounds: int, budgets: list[float]) -> list[dict[str, Any]]:
    """What the search in ``output`` would have chosen after each budget (run-equivalents)."""
    import pyarrow.parquet as pq

    spec = TuneSpec.model_validate(json.loads((output / "search.json").read_text())["spec"])
    table = pq.read_table(output / "trials.parquet").to_pylist()
    baseline = next(r for r in table if r["baseline"])
    trials = [r for r in table if not r["baseline"]]
    ledgers = read_ledgers(output)
    key = accuracy_key(spec)
    curve = []
    for budget in budgets:
        finished = finished_within(budget, ledgers, rounds, baseline["rounds_trained"])
        candidates = [r for r in trials if r["trial_id"] in finished and r["status"] == "completed"]
        best = choose_best(candidates, spec, baseline[key])
        feasible = best is not None and candidates[best][key] >= baseline[key] - MAX_DROP
        curve.append({"run_equivalents": budget, "finished_trials": len(candidates),
                      "chosen": candidates[best]["trial_id"] if feasible else None,
                      "saving": candidates[best]["saving"] if feasible else 0.0,
                      "accuracy_gap": baseline[key] - candidates[best][key] if feasible else None})
    return curve


def plot(searches: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(ALGORITHMS, ("tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:purple"), strict=True))
    for algorithm in ALGORITHMS:
        mine = [s for s in searches if s["algorithm"] == algorithm]
        for i, s in enumerate(mine):
            xs = [p["run_equivalents"] for p in s["curve"]]
            ax.step(xs, [100 * p["saving"] for p in s["curve"]], where="post", c=colours[algorithm],
                    ls="-" if i == 0 else "--", label=f"{algorithm} (seed {s['seed']})")
    ax.set_xlabel("compute spent (run-equivalents: rounds trained by all trials\nand the baseline / rounds of one run)")
    ax.set_ylabel(f"total-bytes saving of the chosen setting (%)\nwithin {100 * MAX_DROP:g} points of FedAvg")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """The benchmark; a signal stops it with one line (rerun the command to continue), a set-up
    error is one ``error:`` line, exit 2."""
    try:
        benchmark()
    except Stopped as stop:
        print(f"{stop.message}; or rerun the same command to continue every search", file=sys.stderr)
        sys.exit(stop.exit_code)
    except (SetupError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_and_record(algorithm: str, seed: int, base: ExperimentConfig, folder: Path, shared_baseline: Path,
                   records: Path) -> tuple[str, dict[str, Any]]:
    """Run, resume or reuse one search (:func:`run_one`), then keep its record and, after the first,
    the shared baseline's history in ``records``; says how it got there, and what it recorded."""
    rounds = base.train.rounds
    clock = time.perf_counter()
    how = run_one(algorithm, seed, base, folder, shared_baseline)
    if not shared_baseline.exists() and read_history(folder / "baseline"):
        shutil.copytree(folder / "baseline", shared_baseline)
    if not (records / "baseline").exists():
        records.mkdir(parents=True, exist_ok=True)
        keep_baseline(shared_baseline, records / "baseline")
    summary = json.loads((folder / "summary.json").read_text())
    curve = anytime(folder, rounds, [b / 4 for b in range(4, int(4 * BUDGET) + 1)])  # every quarter
    search = {**when_it_ran(folder / "summary.json", summary["search_time_s"]),
              "run_equivalents": summary["run_equivalents"], "trials": summary["trials"],
              "statuses": summary["statuses"], "search_time_s": summary["search_time_s"],
              "at": {f"{b:g}": next(p for p in curve if p["run_equivalents"] == b) for b in READ_AT}, "curve": curve}
    record = records / f"{algorithm}-seed{seed}.json"
    write_record(record, search_spec(algorithm, seed, rounds), base, search)
    print(f"  {how} in {time.perf_counter() - clock:.0f} s: {summary['run_equivalents']:.2f} run-equivalents, "
          f"{summary['trials']} trials; saving chosen at "
          + ", ".join(f"{b}: {p['saving']:.1%}" for b, p in search["at"].items()) + f"; recorded in {record}",
          flush=True)
    return how, search


def check_data(base: ExperimentConfig) -> None:
    """SetupError unless the workload's data set is installed (asked only when a search must train)."""
    data_path = base.data.options.get("path")
    if data_path and not Path(data_path).is_dir():
        raise SetupError(f"{base.data.dataset} is not at {data_path}: apt-get install dataset-fashion-mnist "
                         "(or run --quick)")


def benchmark() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, 3 rounds: a smoke test of the whole pipeline")
    parser.add_argument("--output", help="where the searches go (default runs/search-budget[-quick])")
    parser.add_argument("--json", help="the result file (default docs/results/search_budget[_quick].json); "
                                       "the plot goes beside it (.png)")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, help="searcher seeds (default 0 1; --quick: 0)")
    parser.add_argument("--recorded-only", action="store_true",
                        help="run nothing: write the result from the searches recorded so far (a partial "
                             "benchmark's result names the searches still missing)")
    parser.add_argument("--records", help="finished searches' records and the shared baseline's history "
                                          "(default docs/results/search_budget/; --quick: <output>/records)")
    args = parser.parse_args()
    scale = "quick" if args.quick else "paper"
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    setting = SCALES[scale]
    base = workload(scale)
    output = Path(args.output or REPO / setting["output"])
    records = Path(args.records or setting["records"] or output / "records")
    result_path = Path(args.json or setting["json"])
    output.mkdir(parents=True, exist_ok=True)
    shared_baseline = output / "shared-baseline"
    if not shared_baseline.exists() and (records / "baseline" / "summary.json").is_file():
        shutil.copytree(records / "baseline", shared_baseline)  # a fresh checkout: trained in an earlier sitting
    rounds = base.train.rounds
    searches: list[dict[str, Any]] = []
    missing: list[str] = []  # not recorded yet (--recorded-only)
    with contextlib.ExitStack() as cluster:  # one local cluster for every search, started when one must run
        ray_started = False
        for seed in seeds:  # every algorithm's first seed before any second: a comparison from the first sittings
            for algorithm in args.algorithms:
                name, folder = f"{algorithm}-seed{seed}", output / f"{algorithm}-seed{seed}"
                record = records / f"{name}.json"
                if record.is_file():
                    search = read_record(record, search_spec(algorithm, seed, rounds), base)
                    print(f"{algorithm}, searcher seed {seed}: reused from {record}", flush=True)
                    searches.append({"algorithm": algorithm, "seed": seed, "how": "reused", **search})
                    continue
                if args.recorded_only:
                    missing.append(name)
                    continue
                if not ray_started:
                    check_data(base)
                    from actors.backend import ray_session

                    cluster.enter_context(ray_session(base))
                    ray_started = True
                print(f"{algorithm}, searcher seed {seed}: {folder}", flush=True)
                how, search = run_and_record(algorithm, seed, base, folder, shared_baseline, records)
                searches.append({"algorithm": algorithm, "seed": seed, "how": how, **search})
    if not searches:
        raise SetupError(f"no search of this benchmark is recorded in {records} yet: run it without --recorded-only")
    searches.sort(key=lambda s: (ALGORITHMS.index(s["algorithm"]), s["seed"]))
    means = {a: {b: sum(s["at"][b]["saving"] for s in mine) / len(mine) for b in searches[0]["at"]}
             for a in args.algorithms if (mine := [s for s in searches if s["algorithm"] == a])}
    result = {
        "what": "saving of total bytes (uplink + downlink) of the setting each search would choose after "
                f"b run-equivalents, within {100 * MAX_DROP:g} points of FedAvg (means of the last {LAST_N} "
                f"rounds); budget {BUDGET:g} run-equivalents including the baseline"
                + (" -- QUICK SMOKE SCALE (digits, 3 rounds), not the benchmark" if args.quick else ""),
        "scale": scale, "workload": base.to_dict(), "search_space": SPACE, "command": command(), "code": code(),
        "machine": machine(), "started": min(s["started"] for s in searches),
        "finished": max(s["finished"] for s in searches), "mean_saving_chosen": means,
        "searches": searches, "missing": missing,
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    plot(searches, result_path.with_suffix(".png"),
         f"saving chosen against compute ({base.data.dataset}, LeNet-5, {rounds} rounds"
         + (", quick smoke scale" if args.quick else "")
         + (f"; partial: {len(searches)} of {len(searches) + len(missing)} searches)" if missing else ")"))
    print(f"wrote {result_path} and {result_path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
