"""Hyperparameter search, the Ray-free half: the search-file schema, objectives, Pareto front.

``apf-ray tune --config tune_configs/NAME.yaml`` searches dotted config keys (APF's threshold,
EMA α, check interval and aggressive probability, the uplink quantiser, ...) with Ray Tune;
each trial is a full federated run. This module holds what needs no Ray: the validated
search file (:class:`TuneSpec`), the trial configs it implies, the objectives computed from a
trial's round records, the Pareto front over (accuracy, bytes), and the choice of the best
trial. The Ray half is ``actors/tune.py``.

Units: bytes are cumulative wire bytes of a trial up to its last round; accuracy is the
fraction of the test set classified correctly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apf_ray.config import (
    ConfigError,
    ExperimentConfig,
    Name,
    Overrides,
    _format_validation,
    apply_overrides,
    read_yaml_mapping,
)
from apf_ray.config import build_config as build_experiment
from apf_ray.derived import bytes_to_target, mean_of_last_accuracies, saving_at_round, total_bytes
from apf_ray.errors import SetupError
from apf_ray.search_objective import constrained_score, constraint_excess

SEARCH_DRIVER = {"run": "actors.tune:run_search", "resume": "actors.tune:resume_search"}
"""The Ray half of the search, imported by path by the CLI (the core never imports Ray)."""

UNREACHED = 1e30
"""``bytes_to_target`` reported to Tune while the target accuracy has not been reached: a
finite stand-in for "never" (schedulers need finite metrics); tables show it as ``never``.
Also the ``test_loss`` reported for a round whose loss overflowed (recorded as None)."""

DOMAINS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
OBJECTIVE_METRICS = ("accuracy", "bytes_total", "bytes_up", "bytes_to_target", "constrained_saving")
MAXIMISED = ("accuracy", "constrained_saving")
"""Objectives whose default mode is max (the others are bytes: min)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Domain(_Strict):
    """One searched key: exactly one of the distributions."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    quniform: tuple[float, float, float] | None = None
    randint: tuple[int, int] | None = Field(None, description="[low, high): high excluded, as in Ray Tune")
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [k for k in DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAINS)}; got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("uniform", "loguniform", "quniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind}: low ({value[0]}) must be < high ({value[1]})")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {value[0]}")
        if kind == "quniform" and value[2] <= 0:
            raise ValueError(f"quniform: q must be > 0, got {value[2]}")
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind}: give at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAINS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def values(self) -> list[Any]:
        """Every value a grid or choice domain can take (empty for continuous ones)."""
        return list(self.args) if self.kind in ("choice", "grid") else []

    def clip(self, value: Any) -> Any:
        """The value of this domain nearest to ``value``: PBT's explore step multiplies a value by
        0.8 or 1.2, which can leave the range (α = 0.97 × 1.2 = 1.164 is no EMA coefficient).

        ``randint`` keeps an integer in [low, high); ``quniform`` a multiple of q in [low, high];
        a choice or grid value is returned as it is (PBT moves those between listed values).
        """
        if self.kind in ("choice", "grid"):
            return value
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return int(min(max(round(value), low), high - 1))
        clipped = float(min(max(value, low), high))
        if self.kind == "quniform":
            q = self.args[2]
            steps = round(clipped / q)
            steps += (steps * q < low) - (steps * q > high)  # rounding left the range: one step back in
            return float(steps * q)
        return clipped


class Objective(_Strict):
    """One quantity to optimise, computed from a trial's round records."""

    metric: Literal["accuracy", "bytes_total", "bytes_up", "bytes_to_target", "constrained_saving"]
    mode: Literal["max", "min"] | None = Field(None, description="default: max for accuracy and "
                                                               "constrained_saving, min for bytes")
    last_n: int = Field(1, ge=1, description="accuracy, constrained_saving: mean of the last N evaluations "
                                             "(1 = final)")

    @model_validator(mode="after")
    def _default_mode(self) -> Objective:
        if self.mode is None:
            self.mode = "max" if self.metric in MAXIMISED else "min"
        return self

    @property
    def key(self) -> str:
        """The name reported to Tune (``accuracy_last5`` for a mean of the last 5)."""
        return f"accuracy_last{self.last_n}" if self.metric == "accuracy" and self.last_n > 1 else self.metric


class SearchSpec(_Strict):
    algorithm: Literal["random", "grid", "optuna", "optuna_nsga2"] = "random"
    seed: int | None = Field(0, description="seed of the searcher (None: nondeterministic)")
    startup_trials: int | None = Field(None, ge=1, description="optuna (TPE): trials sampled at random before "
                                       "TPE models the others (Optuna's default: 10, so a budget of fewer "
                                       "trials would never leave random search)")
    population: int | None = Field(None, ge=2, description="optuna_nsga2: trials per generation (Optuna's "
                                   "default: 50; a budget of fewer trials never reaches a second generation)")


class SchedulerSpec(_Strict):
    name: Literal["fifo", "asha", "pbt"] = "fifo"
    metric: str | None = Field(None, description="per-round metric the scheduler watches; default: first objective")
    grace_period: int = Field(2, ge=1, description="asha: rounds every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="asha: keep 1/reduction_factor at each rung")
    perturbation_interval: int = Field(2, ge=1, description="pbt: rounds between exploit/explore steps")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="pbt: bottom fraction that copies the top")
    synch: bool = Field(False, description="pbt: perturb the whole population at once — every trial waits at "
                                           "each perturbation round (slower with uneven trials); False: each "
                                           "trial is compared with the others' latest scores when it arrives, "
                                           "and copies a top trial only if that one checkpointed as a top trial")
    mutations: dict[str, Domain] = Field(default_factory=dict,
                                         description="pbt: dotted keys → resampling domains (default: search_space)")


class TuneSpec(_Strict):
    """A search file (``tune_configs/*.yaml``)."""

    name: Name = "tune"
    base: str | dict[str, Any] = Field(..., description="train config: a path relative to this file, or inline")
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted keys applied to the base")
    search_space: dict[str, Domain] = Field(..., min_length=1)
    objective: list[Objective] = Field(..., min_length=1)
    target_accuracy: float | None = Field(None, gt=0, le=1, description="for bytes_to_target")
    max_accuracy_drop: float = Field(0.01, ge=0, le=1, description="best trial: accuracy ≥ baseline − this")
    search: SearchSpec = Field(default_factory=SearchSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    num_samples: int = Field(4, ge=1, description="trials (per grid point for grid domains)")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None: as many as the cluster fits")
    baseline: bool = Field(True, description="run one FedAvg trial on the same workload and seed first")
    trial_failures: int = Field(1, ge=0, description="restarts of a failing trial from its last checkpoint")
    trial_backend: Literal["ray", "inprocess"] = Field(
        "ray", description="where a trial's clients train: ray = client actors from the base's cluster.pools; "
                           "inprocess = in the trial's own process on cluster.torch_threads CPUs, no actors to "
                           "start (small models on one machine; the same rounds, as train --inprocess)")
    max_run_equivalents: float | None = Field(
        None, gt=1, description="stop the search once its trials and baseline trained this many runs' worth of "
                                "rounds (apf_ray.search_objective); None: num_samples alone bounds it")

    @model_validator(mode="after")
    def _consistent(self) -> TuneSpec:
        metrics = [o.metric for o in self.objective]
        if len(set(o.key for o in self.objective)) != len(self.objective):
            raise ValueError(f"objective lists a metric twice: {metrics}")
        if "constrained_saving" in metrics and not self.baseline:
            raise ValueError("objective constrained_saving is measured against the FedAvg baseline: "
                             "set baseline: true")
        if "constrained_saving" in metrics and "accuracy" in metrics:
            raise ValueError("objective constrained_saving judges accuracy itself (its last_n): "
                             "list no accuracy objective beside it")
        if self.max_run_equivalents is not None and not self.baseline:
            raise ValueError("max_run_equivalents counts the baseline's rounds: set baseline: true")
        if "bytes_to_target" in metrics and self.target_accuracy is None:
            raise ValueError("objective bytes_to_target needs target_accuracy")
        multi = len(self.objective) > 1
        if self.search.algorithm == "optuna_nsga2" and not multi:
            raise ValueError("search.algorithm optuna_nsga2 is multi-objective: list at least two objectives")
        if multi and self.search.algorithm in ("random", "grid") and self.scheduler.name == "pbt":
            raise ValueError("pbt optimises one metric; give one objective or set scheduler.metric")
        grids = [k for k, d in self.search_space.items() if d.kind == "grid"]
        if grids and self.search.algorithm in ("optuna", "optuna_nsga2"):
            raise ValueError(f"grid domains ({', '.join(grids)}) need search.algorithm random or grid")
        if self.search.algorithm == "grid" and len(grids) != len(self.search_space):
            raise ValueError("search.algorithm grid needs every search_space key to be a grid domain")
        if self.scheduler.name == "pbt" and self.search.algorithm != "random":
            raise ValueError("pbt explores by itself: use search.algorithm random")
        return self

    def check_new_search(self) -> None:
        """SetupError for what a search file may hold but a new search must not start with.

        PBT's population is its ``num_samples`` members; a trials-at-once limit below that counts
        a paused member as running, so the later members would start only after earlier ones
        finished. (Searches stored before the limit was honoured resume as they began.)
        """
        limit = self.max_concurrent_trials
        if self.scheduler.name == "pbt" and limit is not None and limit < self.num_samples:
            raise SetupError(f"max_concurrent_trials {limit} splits pbt's population of {self.num_samples} "
                             "(num_samples): its later members would start only after earlier ones finished; "
                             "leave max_concurrent_trials unset (members the cluster cannot fit wait their turn) "
                             "or set it to num_samples")

    @property
    def multi_objective(self) -> bool:
        return len(self.objective) > 1

    @property
    def constrained(self) -> bool:
        """Whether the search optimises ``constrained_saving`` (then best.yaml is always feasible)."""
        return any(o.metric == "constrained_saving" for o in self.objective)

    @property
    def scheduler_metric(self) -> tuple[str, str]:
        """(metric, mode) the scheduler watches every round."""
        if self.scheduler.metric is None:
            return self.objective[0].key, self.objective[0].mode
        mode = next((o.mode for o in self.objective if o.key == self.scheduler.metric),
                    "max" if self.scheduler.metric.startswith("accuracy") else "min")
        return self.scheduler.metric, mode


def is_search_file(raw: Mapping[str, Any]) -> bool:
    """Whether a config file's mapping is a search file (``apf-ray tune``) rather than a train config
    (``apf-ray train``): a search file names a ``search_space``, which no train config has."""
    return "search_space" in raw


def is_train_config(raw: Mapping[str, Any]) -> bool:
    """Whether a config file's mapping is a train config: no ``search_space``, and a section only a
    train config has (``data``, ``model``, ``train``, ``strategy``, ...)."""
    sections = set(ExperimentConfig.model_fields) - set(TuneSpec.model_fields)
    return not is_search_file(raw) and bool(sections & set(raw))


def load_tune_spec(path: str | Path, overrides: Overrides = ()) -> tuple[TuneSpec, ExperimentConfig]:
    """The search file at ``path`` (plus overrides of it) and its validated base train config.

    Every searched value (each choice/grid value, both ends of each range, of the search space
    and of PBT's mutations) is also checked against the train config's schema here, so a bad
    search space fails before any trial. A train config given here is named as one.
    """
    path = Path(path)
    raw = read_yaml_mapping(path)
    if is_train_config(raw):
        raise ConfigError(f"{path} is a train config, not a search file (it has no search_space): run it with "
                          f"apf-ray train --config {path}, or search it with a search file whose base is {path}")
    merged, applied = apply_overrides(raw, overrides)
    try:
        spec = TuneSpec.model_validate(merged)
    except Exception as err:  # pydantic's ValidationError, formatted like train-config errors
        from pydantic import ValidationError

        if isinstance(err, ValidationError):
            raise ConfigError(_format_validation(err, str(path), applied)) from None
        raise
    if isinstance(spec.base, str):
        base_path = (path.parent / spec.base).resolve()
        base_raw, source = read_yaml_mapping(base_path), str(base_path)
    else:
        base_raw, source = spec.base, f"{path}: base"
    base = build_experiment(base_raw, spec.overrides, source=source)
    searched = [(f"search_space.{key}", key, d) for key, d in spec.search_space.items()]
    searched += [(f"scheduler.mutations.{key}", key, d) for key, d in spec.scheduler.mutations.items()]
    for field, key, domain in searched:
        samples = domain.values() or [domain.args[0], domain.args[1]]
        for value in samples:
            try:
                build_experiment(base.to_dict(), {key: value}, source=f"{path}: {field}")
            except ConfigError as err:
                raise ConfigError(f"{path}: {field} can take {value!r}, which the train config "
                                  f"refuses: {err}") from None
    return spec, base


def trial_config(base: ExperimentConfig, params: Mapping[str, Any], *, name: str) -> ExperimentConfig:
    """The train config of one trial: the base with the sampled dotted keys, evaluated every round.

    Evaluation runs every round in a search, so the accuracy a scheduler sees is never stale.
    """
    return build_experiment(base.to_dict(), {**params, "train.eval_every": 1, "name": name},
                            source=f"trial {name}")


def baseline_config(base: ExperimentConfig) -> ExperimentConfig:
    """FedAvg on the same workload and seed, with no uplink compression."""
    return build_experiment(base.to_dict(), {"strategy.name": "fedavg", "strategy.uplink": [],
                                             "train.eval_every": 1, "name": f"{base.name}-fedavg"},
                            source="baseline")


def round_metrics(history: Sequence[Any], spec: TuneSpec, baseline_bytes: Sequence[int] | None,
                  baseline_accuracies: Sequence[float] | None = None) -> dict[str, float]:
    """What a trial reports after its latest round: every value finite (see :data:`UNREACHED`).

    ``history`` are the trial's :class:`~apf_ray.records.RoundRecord` so far (evaluated every
    round); ``baseline_bytes[r-1]`` is the baseline's cumulative total bytes after round r, and
    ``baseline_accuracies[r-1]`` its test accuracy at round r (for ``constrained_saving``). The
    numbers are :mod:`apf_ray.derived`'s. A test loss the server recorded as None (it overflowed:
    the model diverged) is reported as :data:`UNREACHED`, worse than any real loss.
    """
    rec = history[-1]
    out = {
        "round": float(rec.round),
        "accuracy": float(rec.test_accuracy),
        "test_loss": UNREACHED if rec.test_loss is None else float(rec.test_loss),
        "bytes_up": float(rec.cum_bytes_up),
        "bytes_down": float(rec.cum_bytes_down),
        "bytes_total": float(total_bytes(rec)),
        "frozen_fraction": float(rec.frozen_fraction),
        "threshold": float(rec.threshold) if rec.threshold is not None else 0.0,
        "wall_s": float(sum(h.wall_s for h in history)),
        "simulated_s": float(rec.cum_simulated_s),
    }
    for objective in spec.objective:
        if objective.metric == "accuracy" and objective.last_n > 1:
            out[objective.key] = float(mean_of_last_accuracies(history, objective.last_n))
    if spec.target_accuracy is not None:
        reached = bytes_to_target(history, spec.target_accuracy)
        out["bytes_to_target"] = UNREACHED if reached is None else float(reached.bytes_total)
    saving = saving_at_round(rec, baseline_bytes)
    if saving is not None:
        out["saving"] = saving
        if spec.constrained and baseline_accuracies is not None:
            out.update(constrained_metrics([h.test_accuracy for h in history], saving, spec,
                                           baseline_accuracies))
    return out


def constrained_metrics(accuracies: Sequence[float], saving: float, spec: TuneSpec,
                        baseline_accuracies: Sequence[float]) -> dict[str, float]:
    """``constrained_saving`` at a trial's latest round (:mod:`apf_ray.search_objective`) and
    ``accuracy_excess``, the accuracy gap beyond ``max_accuracy_drop`` (≤ 0: feasible), which a
    constraint-aware searcher receives as its constraint."""
    last_n = accuracy_rounds(spec)
    excess = constraint_excess(accuracies, baseline_accuracies, last_n, spec.max_accuracy_drop)
    return {"constrained_saving": constrained_score(saving, excess), "accuracy_excess": excess}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (accuracy: higher is better, bytes: lower is better)."""
    front = []
    for i, (acc, size) in enumerate(points):
        dominated = any(a >= acc and b <= size and (a > acc or b < size) for j, (a, b) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][1])


def choose_best(rows: Sequence[Mapping[str, Any]], spec: TuneSpec, baseline_accuracy: float | None) -> int | None:
    """Index of the trial to recommend among completed ones, or None.

    Accuracy is the search's own accuracy objective (e.g. the mean of the last 10 rounds, less
    noisy than the final round), else the final accuracy. Only trials within
    ``max_accuracy_drop`` of the baseline's qualify (all completed ones when there is no
    baseline; when none qualifies, the most accurate — or None for a ``constrained_saving``
    search, which recommends only a feasible setting). One objective: its best value. Several:
    the Pareto point (accuracy, total bytes) with the fewest bytes.
    """
    key = accuracy_key(spec)
    done = [i for i, r in enumerate(rows) if r["status"] == "completed" and r.get(key) is not None]
    if not done:
        return None
    eligible = done
    if baseline_accuracy is not None:
        eligible = [i for i in done if rows[i][key] >= baseline_accuracy - spec.max_accuracy_drop]
        if not eligible:
            return None if spec.constrained else max(done, key=lambda i: rows[i][key])
    if spec.multi_objective:
        front = pareto_front([(rows[i][key], rows[i]["bytes_total"]) for i in eligible])
        return eligible[front[0]]
    objective = spec.objective[0]
    sign = 1.0 if objective.mode == "max" else -1.0
    return max(eligible, key=lambda i: sign * _objective_value(rows[i], objective))


def accuracy_rounds(spec: TuneSpec) -> int:
    """How many of a trial's last evaluations its judged accuracy averages: the accuracy (or
    constrained_saving) objective's ``last_n``, else 1 (the final accuracy)."""
    return next((o.last_n for o in spec.objective if o.metric in MAXIMISED), 1)


def accuracy_key(spec: TuneSpec) -> str:
    """The row key accuracy is judged by: ``accuracy_lastN``, the mean of the last N evaluations
    when the accuracy objective averages N > 1 of them, else ``final_accuracy``."""
    rounds = accuracy_rounds(spec)
    return f"accuracy_last{rounds}" if rounds > 1 else "final_accuracy"


def _objective_value(row: Mapping[str, Any], objective: Objective) -> float:
    value = row.get(objective.key)
    if value is None:
        return -math.inf if objective.mode == "max" else math.inf
    return float(value)
