"""Ray Tune search over APF's knobs: each trial is a real federated run on Ray.

``apf-ray tune --config tune_configs/NAME.yaml`` lands here (the CLI imports this module by
path, so the core never imports Ray). The search file is validated by
:mod:`apf_ray.tuning`; this module turns it into a Tune experiment:

- **Trials are federated runs**: the trainable calls :func:`apf_ray.run.run` with the Ray
  backend. Its server actor and client-pool actors live inside the trial's placement group,
  whose bundles come from :func:`apf_ray.placement.trial_bundles` (one per client actor), and
  the pools size themselves from those bundles, so concurrent trials never wait on each
  other's actors. With ``trial_backend: inprocess`` the trial trains its clients in its own
  process instead (one bundle of ``cluster.torch_threads`` CPUs, no actor to start): for
  small models on one machine, where starting a trial's actors costs more than its rounds.
- **One dataset copy**: the driver loads the dataset once and puts it in the object store;
  trials receive the reference (wrapped in a list, so Ray does not copy it per trial).
- **Reporting**: a run callback reports after every round (all values finite, see
  :func:`apf_ray.tuning.round_metrics`) and attaches the run's own checkpoint as a
  ``tune.Checkpoint`` whenever the run writes one. A trial that fails restarts from it
  (``FailureConfig``); a PBT exploit continues the donor's run — same round, same controller
  state — with only the mutated knobs changed.
- **Baseline**: one FedAvg trial on the same workload and seed runs first; every saving is
  measured against its bytes at the same round.

Output folder: ``trials/<id>/`` and ``baseline/`` (each a run directory with TensorBoard
events, so ``tensorboard --logdir OUTPUT`` shows them side by side), ``tune/`` (Tune's own
experiment state and checkpoint copies), ``search.json`` (the resolved search, for
``--resume``), and at the end ``trials.parquet``, ``pareto.png``, ``best.yaml``,
``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import yaml
from ray import tune
from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from actors import ray_private
from actors.backend import RayBackend, await_trial_capacity, ray_session, trials_at_a_time
from apf_ray.backends import InProcessBackend
from apf_ray.callbacks import Callback, RunContext
from apf_ray.client_store import self_contained
from apf_ray.config import ExperimentConfig, build_config
from apf_ray.data import load_dataset
from apf_ray.derived import (
    best_accuracy,
    bytes_to_target,
    evaluated,
    final_accuracy,
    mean_of_last,
    mean_of_last_accuracies,
    saving_at_round,
    total_bytes,
)
from apf_ray.errors import SetupError, Stopped, clip, describe
from apf_ray.metrics import (
    JOURNAL,
    plot_history,
    read_history,
    run_title,
    save_figure,
    summarize,
    write_json,
    write_tables,
)
from apf_ray.outputs import SEARCH_FILE, check_search_folder, refuse_for_search
from apf_ray.placement import trial_bundles
from apf_ray.records import RoundEvent, RoundRecord
from apf_ray.resume import read_resume_point
from apf_ray.run import run
from apf_ray.search_objective import (
    BASELINE_LEDGER,
    ledger_path,
    record_round,
    rounds_trained,
    run_equivalents,
)
from apf_ray.stops import StopSignals
from apf_ray.tuning import (
    UNREACHED,
    Domain,
    TuneSpec,
    accuracy_key,
    accuracy_rounds,
    baseline_config,
    choose_best,
    constrained_metrics,
    pareto_front,
    round_metrics,
    trial_config,
)

ENCODED = "yaml:"
"""Prefix of a choice value that is not a scalar (e.g. an uplink chain), sent to searchers as text:
Optuna's categorical values must be None, bool, int, float or str."""


# --------------------------------------------------------------------------- search space


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return ENCODED + yaml.safe_dump(value, default_flow_style=True).strip()


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(ENCODED):
        return yaml.safe_load(value[len(ENCODED):])
    return value


def tune_domain(domain: Domain) -> Any:
    """The Ray Tune sampler for one searched key."""
    args = domain.args
    if domain.kind == "uniform":
        return tune.uniform(*args)
    if domain.kind == "loguniform":
        return tune.loguniform(*args)
    if domain.kind == "quniform":
        return tune.quniform(*args)
    if domain.kind == "randint":
        return tune.randint(*args)
    if domain.kind == "choice":
        return tune.choice([_encode(v) for v in args])
    return tune.grid_search([_encode(v) for v in args])


def sampled_params(config: Mapping[str, Any], spec: TuneSpec) -> dict[str, Any]:
    """The searched dotted keys of a trial's Tune config, decoded."""
    return {key: _decode(config[key]) for key in spec.search_space if key in config}


# --------------------------------------------------------------------------- the trial


class TuneReporter(Callback):
    """Reports every round to Tune and attaches the run's checkpoint when one was written.

    The last round is reported from ``on_end``, after the run wrote its tables and summary:
    a scheduler may end the trial as soon as it sees the final round. Every round trained is
    appended to the trial's ``ledger`` first (:mod:`apf_ray.search_objective`), so the search's
    compute is counted before any scheduler or budget acts on the round.
    """

    needs_written_checkpoints = True  # each one is handed to Tune as soon as it is taken

    def __init__(self, spec: TuneSpec, baseline_bytes: list[int] | None, ledger: Path,
                 baseline_accuracies: list[float] | None = None) -> None:
        self.spec, self.baseline_bytes, self.baseline_accuracies = spec, baseline_bytes, baseline_accuracies
        self.ledger = ledger
        self.history: list[RoundRecord] = []
        self.final: tuple[dict[str, float], Path | None] | None = None

    def on_start(self, ctx: RunContext) -> None:
        self.rounds = ctx.cfg.train.rounds
        if ctx.start_round:  # the rounds this trial already ran (a restart, or a PBT exploit's own past)
            self.history = [h for h in read_history(ctx.run_dir) if h.round <= ctx.start_round]

    def on_round(self, event: RoundEvent) -> None:
        record_round(self.ledger, event.record.round)
        self.history.append(event.record)
        metrics = self._metrics()
        if event.record.round >= self.rounds:
            self.final = (metrics, event.checkpoint)
        else:
            self._report(metrics, event.checkpoint)

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.final is not None:
            self._report(*self.final)
        elif self.history:  # restored at the last round (a late PBT exploit): nothing ran, say where it stands
            self._report(self._metrics(), None)

    def _metrics(self) -> dict[str, float]:
        return round_metrics(self.history, self.spec, self.baseline_bytes, self.baseline_accuracies)

    @staticmethod
    def _report(metrics: dict[str, float], checkpoint: Path | None) -> None:
        """Report ``metrics``, with a copy of ``checkpoint`` carrying its clients' state files:
        Tune copies it into the trial's storage before ``report`` returns, so the staging copy
        (hard links) goes at once."""
        if checkpoint is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix=".tune-", dir=checkpoint.parent) as tmp:
            staged = self_contained(checkpoint, Path(tmp) / checkpoint.name)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(staged)))


def _log_resume(run_dir: Path, resume: Any, cfg: ExperimentConfig) -> None:
    """Append to ``resumes.jsonl`` where this trial continued from: its own checkpoint after a
    failure, or a donor's after a PBT exploit (``from`` names the run the state came from)."""
    controller = resume.server["strategy"].get("controller", {})
    digest = hashlib.sha256()
    for key in ("ref", "ema", "abs_ema", "period", "remaining"):
        if key in controller:
            digest.update(controller[key].tobytes())
    entry = {"round": resume.round, "from": resume.config["name"], "into": cfg.name,
             "options": cfg.strategy.options, "donor_options": resume.config["strategy"]["options"],
             "controller_sha256": digest.hexdigest() if controller else None}
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def federated_trial(config: dict[str, Any], shared: dict[str, Any]) -> None:
    """Tune's function trainable: one federated run, resumed from Tune's checkpoint if it has one."""
    spec = TuneSpec.model_validate(shared["spec"])
    base = build_config(shared["base"], source="search base")
    trial_id = tune.get_context().get_trial_id()
    ledger = ledger_path(Path(shared["output"]), BASELINE_LEDGER if config.get("baseline") else trial_id)
    if config.get("baseline"):
        cfg, run_dir, baseline_bytes = baseline_config(base), Path(shared["output"]) / "baseline", None
    else:
        cfg = trial_config(base, sampled_params(config, spec), name=f"{base.name}-{trial_id}")
        run_dir, baseline_bytes = Path(shared["output"]) / "trials" / trial_id, shared["baseline_bytes"]
    if spec.scheduler.name == "pbt":  # PBT exploits only at rounds that carry a checkpoint
        cfg = build_config(cfg.to_dict(), {"output.checkpoint_every": spec.scheduler.perturbation_interval})
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            resume = read_resume_point(Path(path))
        _log_resume(run_dir, resume, cfg)
    dataset_ref = shared["dataset_ref"][0]
    # A PBT exploit continues a donor trial's run under this trial's name and hyperparameters. Without
    # a checkpoint the trial starts over, and its folder is Tune's: what an earlier attempt of this
    # trial left there (a failure, a killed search) is replaced, not refused.
    reporter = TuneReporter(spec, baseline_bytes, ledger, shared.get("baseline_accuracy"))
    backend = RayBackend(dataset_ref=dataset_ref) if spec.trial_backend == "ray" else InProcessBackend()
    run(cfg, run_dir, backend=backend, callbacks=[reporter],
        resume=resume, dataset=ray.get(dataset_ref), resume_may_change=("name", *spec.search_space),
        overwrite=resume is None, claim=False)  # the search's driver holds the folder


# --------------------------------------------------------------------------- progress


class SearchProgress(tune.Callback):
    """The search on the terminal: a live table of trials (running / done / stopped / errored)
    with the best so far; in a log (not a terminal), one line per finished trial instead."""

    def __init__(self, console: Console, spec: TuneSpec, rounds: int, phase: str, *, silent: bool = False) -> None:
        self.console, self.spec, self.rounds, self.phase, self.silent = console, spec, rounds, phase, silent
        self.metric, self.mode = spec.scheduler_metric
        self.last: dict[str, dict[str, float]] = {}
        self.state: dict[str, str] = {}
        self.live: Live | None = None

    def _best(self) -> tuple[str, dict[str, float]] | None:
        seen = [(t, m) for t, m in self.last.items() if self.metric in m and self.state.get(t) != "errored"]
        if not seen:
            return None
        sign = 1 if self.mode == "max" else -1
        return max(seen, key=lambda tm: sign * tm[1][self.metric])

    def _headline(self) -> str:
        counts = {s: list(self.state.values()).count(s) for s in ("running", "done", "stopped", "errored")}
        best = self._best()
        best_text = f" · best {self.metric} {best[1][self.metric]:.4g} ({best[0]})" if best else ""
        return f"{self.phase}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + best_text

    def _render(self) -> Table:
        table = Table(title=self._headline(), box=None)
        shown = list(self.last.items())[-8:]
        _trial_column(table, [trial for trial, _ in shown])
        for col in ("state", "round", "accuracy", "MB total", "saving", "frozen"):
            table.add_column(col, justify="left" if col == "state" else "right")
        for trial, m in shown:
            saving = f"{m['saving']:.1%}" if "saving" in m else "—"
            table.add_row(trial, self.state[trial], f"{int(m.get('round', 0))}/{self.rounds}",
                          f"{m.get('accuracy', 0.0):.3f}", f"{m.get('bytes_total', 0.0) / 1e6:.1f}", saving,
                          f"{m.get('frozen_fraction', 0.0):.0%}")
        return table

    def _refresh(self) -> None:
        if self.silent or not self.console.is_terminal:
            return
        if self.live is None:
            self.live = Live(self._render(), console=self.console, refresh_per_second=2, transient=True)
            self.live.start()
        else:
            self.live.update(self._render())

    def _line(self, trial: str) -> None:
        if not self.silent and not self.console.is_terminal:
            m = self.last.get(trial, {})
            self.console.print(f"{self.phase}: trial {trial} {self.state[trial]} at round "
                               f"{int(m.get('round', 0))}/{self.rounds}, accuracy {m.get('accuracy', 0.0):.3f}")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.state[trial.trial_id] = "running"
        self.last.setdefault(trial.trial_id, {})
        self._refresh()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.last[trial.trial_id] = {k: v for k, v in result.items() if isinstance(v, int | float)}
        self._refresh()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        done = self.last.get(trial.trial_id, {}).get("round", 0) >= self.rounds
        self.state[trial.trial_id] = "done" if done else "stopped"
        self._refresh()
        self._line(trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.state[trial.trial_id] = "errored"
        self._refresh()
        self._line(trial.trial_id)

    def close(self) -> None:
        """The last headline. A trial still running when Tune returns was ended without a completion
        event (the compute budget stopping the search, or a stop signal): it counts as stopped."""
        if self.live is not None:
            self.live.stop()
            self.live = None
        self.state = {trial: "stopped" if state == "running" else state for trial, state in self.state.items()}
        if self.state and not self.silent:
            self.console.print(self._headline())

    def __getstate__(self) -> dict:  # Tune pickles callbacks into its experiment state
        return {**self.__dict__, "live": None, "console": None}

    def __setstate__(self, state: dict) -> None:  # a restored search draws on this process's terminal
        self.__dict__.update(state, console=Console())


# --------------------------------------------------------------------------- stops


class SearchStopped(Stopped):
    """SIGINT or SIGTERM stopped the search; ``apf-ray tune --resume`` finishes it.

    A first signal lets Tune stop its trials and save its experiment state: each unfinished
    trial continues from its last checkpoint. A second one stops at once; Tune's state of a
    moment before (saved every few seconds) stays. ``phase`` is what was running: ``baseline``
    or ``search`` (or ``set-up``, before either).
    """

    def __init__(self, signum: int, output: Path, phase: str, *, abandoned: bool = False) -> None:
        self.phase, self.run_dir, self.abandoned = phase, Path(output), abandoned
        during = {"set-up": "before its baseline started", "baseline": "during its FedAvg baseline",
                  "search": "during its trials"}[phase]
        how = "at once (second signal), " if abandoned else ""
        super().__init__(signum, f"stopped the search {how}{during} by {signal.Signals(signum).name}; "
                                 f"resume with apf-ray tune --resume {output}")


class SearchStops(StopSignals):
    """The search's SIGINT/SIGTERM handlers, held for the whole search.

    While Tune runs a phase (:meth:`tune_running`), the first signal is handed to Tune's own
    interrupt handler — the one it installs for SIGUSR1 each time it starts (SIGINT is left
    to us: ``TUNE_DISABLE_SIGINT_HANDLER``) — so Tune stops its trials and saves its experiment
    state before it returns. At any other moment (loading data, starting Ray, Tune not yet
    listening), and for a second signal, :class:`~apf_ray.stops.Abandon` stops at once.
    ``notice(signal_name)`` is called when a first signal starts Tune's stop (it takes seconds).
    """

    def __init__(self, notice: Callable[[str], None]) -> None:
        super().__init__()
        self.notice = notice
        self._stale: Any = None  # the SIGUSR1 handler found before the phase started (an earlier phase's)
        self._running = False
        self.received = 0  # signals so far

    @contextmanager
    def tune_running(self) -> Iterator[None]:
        self._stale, self._running = signal.getsignal(signal.SIGUSR1), True
        try:
            yield
        finally:
            self._running = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received += 1
        interrupt = signal.getsignal(signal.SIGUSR1)
        if self.received == 1 and self._running and callable(interrupt) and interrupt is not self._stale:
            self.signum = signum
            interrupt(signal.SIGUSR1, frame)  # Tune's: it ends its loop after the current step
            # Said from a thread, not from here: a handler runs between two bytecodes of whatever the
            # main thread was doing, a print to the same console included, and re-entering its write
            # buffer printed a line twice (seen in CI); the thread waits for the console's lock.
            threading.Thread(target=self.notice, args=(signal.Signals(signum).name,), name="stop-notice",
                             daemon=True).start()
            return
        super()._handle(signum, frame)  # not graceful: records the signal, raises Abandon


# --------------------------------------------------------------------------- the experiment


def quiet_tune() -> None:
    """Keep Tune's own console output out of the user's terminal (our progress table replaces it),
    and its SIGINT handler out of the way of :class:`SearchStops`."""
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # no traceback per failed trial
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # our runs write TensorBoard/Parquet
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # experiment state saved often: resume loses little
    for name in ("ray.tune", "ray.train"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"ray\.(tune|train).*")


def _trainable(cfg: ExperimentConfig, shared: dict[str, Any], trial_backend: str) -> Any:
    return tune.with_resources(tune.with_parameters(federated_trial, shared=shared),
                               tune.PlacementGroupFactory(trial_bundles(cfg, trial_backend)))


def _search_algorithm(spec: TuneSpec) -> Any:
    """The searcher, holding the search's trials-at-once limit; Tune pickles it with its state (tested for
    every algorithm, see actors/samplers.py).

    The limit lives here, not in ``TuneConfig.max_concurrent_trials``: Tune ignores that one (with only a
    log warning) for a random search's generator, which ran two trials at once when one was asked.
    """
    limit = spec.max_concurrent_trials or 0
    if spec.search.algorithm not in ("optuna", "optuna_nsga2"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=limit)
    from ray.tune.search import ConcurrencyLimiter

    searcher = _optuna_searcher(spec)
    return ConcurrencyLimiter(searcher, max_concurrent=limit) if limit else searcher


def _optuna_searcher(spec: TuneSpec) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory ..."
    given = spec.search
    if given.algorithm == "optuna":
        from actors.constrained_search import ConstrainedOptunaSearch

        searcher = ConstrainedOptunaSearch if spec.constrained else OptunaSearch
        startup = {} if given.startup_trials is None else {"n_startup_trials": given.startup_trials}
        return searcher(metric=spec.objective[0].key, mode=spec.objective[0].mode,
                        sampler=optuna.samplers.TPESampler(seed=given.seed, **startup))
    from actors.samplers import PicklableNSGAIISampler

    population = {} if given.population is None else {"population_size": given.population}
    return OptunaSearch(metric=[o.key for o in spec.objective], mode=[o.mode for o in spec.objective],
                        sampler=PicklableNSGAIISampler(seed=given.seed, **population))


class KeepInDomains:
    """PBT's ``custom_explore_fn``: each mutated value put back inside its domain (:meth:`Domain.clip`).

    Ray's explore step multiplies a continuous value by 0.8 or 1.2 without bounds; a value the
    train config refuses (α ≥ 1) made its trial fail. The domains' ends were checked against the
    train config's schema when the search file was loaded. A class, not a closure: Tune pickles
    the scheduler with its experiment state.
    """

    def __init__(self, mutations: Mapping[str, Domain]) -> None:
        self.mutations = dict(mutations)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, domain in self.mutations.items():
            if key in config:
                config[key] = domain.clip(config[key])
        return config


class _WithoutErrored:
    """Tune's controller as PBT sees it, less the errored trials (Ray keeps those among the "live" ones)."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller

    def __getattr__(self, name: str) -> Any:
        return getattr(self._controller, name)

    def get_trials(self) -> list[Trial]:
        return [t for t in self._controller.get_trials() if t.status != Trial.ERROR]

    def get_live_trials(self) -> list[Trial]:
        return [t for t in self._controller.get_live_trials() if t.status != Trial.ERROR]


class ResilientPBT(PopulationBasedTraining):
    """Ray's population-based training, where an errored member no longer stalls the others.

    Ray counts an errored trial among the live ones, so with ``synch`` every other trial waited
    for it at the next perturbation round, forever. Here the population is the trials that have
    not errored; an errored trial's last score is dropped (it is never a donor); and if every
    remaining member already waits at the perturbation round when one errors — so no result will
    arrive to start the step — the step starts from the last result of a waiting member.
    (Uses PBT's ``_synch`` and ``_trial_state`` through :mod:`actors.ray_private`: Ray has no
    public hook for either.)
    """

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        return super().on_trial_result(_WithoutErrored(tune_controller), trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        super().on_trial_error(tune_controller, trial)
        ray_private.pbt_forget(self, trial)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        chosen = super().choose_trial_to_run(tune_controller)
        if chosen is None and ray_private.pbt_synchronous(self):
            members = _WithoutErrored(tune_controller).get_live_trials()
            if members and all(t.status == Trial.PAUSED for t in members):
                self.on_trial_result(tune_controller, members[0], members[0].last_result)
                chosen = super().choose_trial_to_run(tune_controller)
        return chosen


class ComputeBudget(tune.Stopper):
    """Stops the whole search once its trials and baseline trained ``max_run_equivalents`` runs'
    worth of rounds (:mod:`apf_ray.search_objective`); trials running then stop where they are
    (each overshoots by at most the round it was training). The spend is read from the ledgers
    on disk after each result, so a resumed search starts from what it already spent.
    """

    def __init__(self, output: Path, rounds_per_run: int, budget: float, baseline_rounds: int) -> None:
        self.output, self.rounds_per_run, self.budget = output, rounds_per_run, budget
        self.baseline_rounds = baseline_rounds
        self.spent = self._spent()

    def _spent(self) -> float:
        return run_equivalents(rounds_trained(self.output, self.baseline_rounds), self.rounds_per_run)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.spent = self._spent()
        return False

    def stop_all(self) -> bool:
        return self.spent >= self.budget


def _budget(spec: TuneSpec, output: Path, rounds: int, baseline_rounds: int) -> ComputeBudget | None:
    if spec.max_run_equivalents is None:
        return None
    return ComputeBudget(output, rounds, spec.max_run_equivalents, baseline_rounds)


def _scheduler(spec: TuneSpec, rounds: int) -> Any:
    metric, mode = spec.scheduler_metric
    s = spec.scheduler
    if s.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="round", metric=metric, mode=mode, max_t=rounds,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        mutations = s.mutations or spec.search_space
        # Listed values move to a neighbour or are resampled; continuous ones are scaled, then clipped.
        hyperparam_mutations = {k: [_encode(v) for v in d.values()] if d.values() else tune_domain(d)
                                for k, d in mutations.items()}
        return ResilientPBT(time_attr="round", metric=metric, mode=mode,
                            perturbation_interval=s.perturbation_interval,
                            quantile_fraction=s.quantile_fraction, synch=s.synch,
                            hyperparam_mutations=hyperparam_mutations, custom_explore_fn=KeepInDomains(mutations))
    return None


def _fit(tuner_or_restore: Any, progress: SearchProgress) -> Any:
    try:
        return tuner_or_restore.fit()
    finally:
        progress.close()


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial is named after its id, like the trial's run folder under trials/.

    (Not ``result.metrics["trial_id"]``: after a PBT exploit a trial's last result is the donor's.)
    """
    return trial.trial_id


def _restorable(path: Path) -> bool:
    """Whether Tune saved an experiment state in ``path`` to resume from. A search that failed as
    it started (before any trial) leaves only its Tuner's state, maybe empty: it starts anew."""
    return tune.Tuner.can_restore(str(path)) and any(path.glob("experiment_state-*.json"))


def _experiment(name: str, output: Path, cfg: ExperimentConfig, shared: dict[str, Any], spec: TuneSpec,
                param_space: dict[str, Any], tune_config: tune.TuneConfig, console: Console,
                resume: bool, quiet: bool, stop: tune.Stopper | None = None) -> Any:
    tune_config.trial_dirname_creator = _trial_dirname
    progress = SearchProgress(console, spec, cfg.train.rounds, name, silent=quiet)
    storage = (output / "tune").resolve()
    trainable = _trainable(cfg, shared, spec.trial_backend)
    if resume and _restorable(storage / name):
        tuner = tune.Tuner.restore(str(storage / name), trainable=trainable, resume_errored=True)
        return _fit(tuner, progress)
    # PBT restores donors' checkpoints some time after choosing them: keep them all (disk: one copy
    # of the run's checkpoint per perturbation interval per trial); otherwise the last two suffice.
    keep = None if spec.scheduler.name == "pbt" else 2
    run_config = tune.RunConfig(
        name=name, storage_path=str(storage), verbose=0, callbacks=[progress], stop=stop,
        failure_config=tune.FailureConfig(max_failures=spec.trial_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=keep),
    )
    return _fit(tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config),
                progress)


def _row(trial_id: str, status: str, params: Mapping[str, Any], history: list[RoundRecord], spec: TuneSpec,
         baseline_total: list[int] | None, trained: int, baseline_accuracies: list[float] | None = None
         ) -> dict[str, Any]:
    """One trial's line of trials.parquet, from its own journal (the numbers: :mod:`apf_ray.derived`);
    ``trained``: the rounds it trained (its ledger: rounds lost to a failure or replaced by a PBT
    exploit included)."""
    last = history[-1] if history else None
    row: dict[str, Any] = {
        "trial_id": trial_id, "status": status, **{f"param:{k}": _encode(v) for k, v in params.items()},
        "rounds": last.round if last else 0,
        "final_accuracy": final_accuracy(history),
        "best_accuracy": best_accuracy(history),
        "bytes_up": last.cum_bytes_up if last else None,
        "bytes_down": last.cum_bytes_down if last else None,
        "bytes_total": total_bytes(last) if last else None,
        "saving": saving_at_round(last, baseline_total) if last else None,
        "frozen_fraction_final": last.frozen_fraction if last else None,
        "rounds_trained": trained,
    }
    if spec.target_accuracy is not None:
        reached = bytes_to_target(history, spec.target_accuracy)
        row["bytes_to_target"] = math.inf if reached is None else reached.bytes_total
    for objective in spec.objective:
        if objective.metric == "accuracy":
            row[objective.key] = mean_of_last_accuracies(history, objective.last_n)
    if spec.constrained:
        accs = [h.test_accuracy for h in evaluated(history)]
        row[accuracy_key(spec)] = mean_of_last(accs, accuracy_rounds(spec)) if accs else None
        row["constrained_saving"] = None
        if row["saving"] is not None and baseline_accuracies and accs:
            row["constrained_saving"] = constrained_metrics(accs, row["saving"], spec,
                                                            baseline_accuracies)["constrained_saving"]
    return row


def _status(result: Any, history: list[RoundRecord], rounds: int) -> str:
    """How a trial ended; ``completed`` when its run trained all its rounds, also when the compute
    budget stopped the search before Tune received that last round (it is reported after the run's
    tables are written)."""
    if result.error is not None:
        return "errored"
    last = max((result.metrics or {}).get("round", 0), history[-1].round if history else 0)
    return "completed" if last >= rounds else "early_stopped"


def _close_run_folder(run_dir: Path, status: str) -> None:
    """``summary.json`` and ``curves.png`` of a trial whose run did not reach its end (a scheduler
    stopped it early, or it errored), from its journal, as a finished run has them; the summary's
    ``search_status`` says how it ended."""
    history = read_history(run_dir)
    if not history or not (run_dir / "config.yaml").is_file():
        return
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = summarize(cfg, history)
    summary.update(run_dir=str(run_dir), search_status=status)
    write_json(run_dir / "summary.json", summary)
    if cfg["output"]["plots"]:
        how = "stopped early by the scheduler" if status == "early_stopped" else status
        plot_history(run_dir / "curves.png", {cfg["strategy"]["name"]: history},
                     title=f"{run_title(run_dir, cfg['name'], cfg['strategy']['name'])} "
                           f"({how} at round {history[-1].round})")


def _accuracy_label(spec: TuneSpec) -> str:
    """The judged accuracy (:func:`apf_ray.tuning.accuracy_key`) in words, for an axis."""
    rounds = accuracy_rounds(spec)
    what = "final test accuracy" if rounds == 1 else f"test accuracy, mean of the last {rounds} rounds"
    return f"{what} (fraction correct)"


def pareto_figure(rows: list[dict[str, Any]], front: list[int], base: dict[str, Any] | None, best: int | None,
                  title: str, spec: TuneSpec) -> Any:
    """A matplotlib figure: the judged accuracy against total bytes (MB) per trial, the Pareto
    front (a line through markers, so a front of one point shows), the baseline and the best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = accuracy_key(spec)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    done = [r for r in rows if r.get(key) is not None]
    colours = {"completed": "tab:blue", "early_stopped": "tab:gray", "errored": "tab:red"}
    for status, colour in colours.items():
        pts = [(r["bytes_total"] / 1e6, r[key]) for r in done if r["status"] == status]
        if pts:
            ax.scatter(*zip(*pts, strict=True), c=colour, label=f"trials ({status.replace('_', ' ')})", s=28)
    if front:
        pts = sorted((rows[i]["bytes_total"] / 1e6, rows[i][key]) for i in front)
        ax.plot(*zip(*pts, strict=True), "-D", c="tab:orange", markersize=9, markerfacecolor="none",
                label="Pareto front", zorder=1)
    if base is not None:
        ax.scatter([base["bytes_total"] / 1e6], [base[key]], marker="*", s=220, c="black",
                   label="FedAvg baseline", zorder=3)
    if best is not None:
        ax.scatter([rows[best]["bytes_total"] / 1e6], [rows[best][key]], marker="o", s=160,
                   facecolors="none", edgecolors="tab:green", linewidths=2, label="best (best.yaml)", zorder=3)
    ax.set_xlabel("total bytes, uplink + downlink (MB)")
    ax.set_ylabel(_accuracy_label(spec))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _trial_column(table: Table, trial_ids: list[str]) -> None:
    """The first column of a table of trials: ids are never cut or wrapped."""
    table.add_column("trial", min_width=max((len(t) for t in trial_ids), default=5))


def _results_table(rows: list[dict[str, Any]], spec: TuneSpec, best: int | None) -> Table:
    """The trials, best first by the first objective; readable at 80 columns: the trial id, status
    and numbers are never cut, and the searched settings (``name=value`` each) wrap between them."""
    objective = spec.objective[0]
    sign = -1 if objective.mode == "max" else 1

    def order(i: int) -> float:
        value = rows[i].get(objective.key)
        return math.inf if value is None else sign * float(value)

    params = [k for k in rows[0] if k.startswith("param:")] if rows else []
    names = [p.rsplit(".", 1)[-1] for p in params]
    if len(set(names)) < len(names):  # two keys end alike: show them whole
        names = [p.removeprefix("param:") for p in params]
    key = accuracy_key(spec)
    rounds = accuracy_rounds(spec)
    accuracy = "final acc" if rounds == 1 else f"acc (last {rounds})"
    judged = objective.metric if objective.metric != "accuracy" else (
        "final accuracy" if objective.last_n == 1 else f"accuracy (mean of the last {objective.last_n})")
    cells = []
    for i in sorted(range(len(rows)), key=order):
        r = rows[i]
        cells.append([
            r["trial_id"] + (" ★" if i == best else ""), r["status"], str(r["rounds"]),
            "—" if r.get(key) is None else f"{r[key]:.4f}",
            "—" if r["bytes_total"] is None else f"{r['bytes_total'] / 1e6:.1f}",
            "—" if r["saving"] is None else f"{r['saving']:.1%}",
            escape(" ".join(f"{n}={_short(r[p])}" for n, p in zip(names, params, strict=True))),
        ])
    table = Table(title=f"{spec.name}: trials by {judged}, best first", box=box.SIMPLE_HEAD, show_edge=False,
                  padding=0)
    _trial_column(table, [c[0] for c in cells])
    for col, header in enumerate(("status", "rounds", accuracy, "MB total", "saving"), start=1):
        widest = max([len(c[col]) for c in cells] + [len(w) for w in header.split()])  # headers wrap, values never
        table.add_column(header, justify="left" if col == 1 else "right", min_width=widest)
    table.add_column("settings", overflow="fold")
    for row in cells:
        table.add_row(*row)
    return table


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).removeprefix(ENCODED)


def run_search(spec: TuneSpec, base: ExperimentConfig, output: Path, *, address: str | None = None,
               resume: bool = False, verbose: bool = False, quiet: bool = False,
               console: Console | None = None) -> dict[str, Any]:
    """Run (or finish) the search into ``output``; returns the search summary (also summary.json).

    ``quiet`` leaves out the live trial table and progress lines (the final table stays);
    ``verbose`` shows Ray's own logs.
    """
    console = console or Console()
    say = (lambda *_: None) if quiet else console.print
    if not resume:
        spec.check_new_search()
    limited = trials_at_a_time(base, address, spec.max_concurrent_trials or spec.num_samples,  # before any cluster
                               spec.trial_backend)
    if limited:
        say(f"[yellow]note:[/yellow] {limited}")
    output = Path(output).resolve()
    refuse_for_search(output, resume)  # a run, or another search, is never mixed into (the caller claims it)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / SEARCH_FILE, {"spec": spec.model_dump(mode="json"), "base": base.to_dict()})
    quiet_tune()
    phase = "set-up"

    def stopping(signal_name: str) -> None:
        say(f"[yellow]{signal_name}: stopping the trials and saving the search's state; "
            "a second signal stops at once")

    with SearchStops(stopping) as stops:
        try:
            dataset = load_dataset(base.data.dataset, **base.data.options)  # once, before any cluster starts
            started = time.perf_counter()
            with ray_session(base, address, verbose):
                await_trial_capacity(base, spec.trial_backend)  # joined: says what a trial waits for, gives up
                dataset_ref = ray.put(dataset)
                shared: dict[str, Any] = {"spec": spec.model_dump(mode="json"), "base": base.to_dict(),
                                          "output": str(output), "dataset_ref": [dataset_ref],
                                          "baseline_bytes": None}
                baseline_rows: list[RoundRecord] = []
                if spec.baseline:
                    baseline_rows = read_history(output / "baseline")
                    if len(baseline_rows) < base.train.rounds:
                        phase = "baseline"
                        say("[bold]baseline[/bold]: FedAvg on the same workload and seed")
                        with stops.tune_running():
                            _experiment("baseline", output, base, shared, spec, {"baseline": True},
                                        tune.TuneConfig(num_samples=1), console, resume, quiet)
                        if stops.requested:
                            raise SearchStopped(stops.signum, output, phase)
                        baseline_rows = read_history(output / "baseline")
                        _check_baseline(output, baseline_rows, base.train.rounds)
                    shared["baseline_bytes"] = [total_bytes(h) for h in baseline_rows]
                    shared["baseline_accuracy"] = [h.test_accuracy for h in baseline_rows]
                phase = "search"
                say(f"[bold]search[/bold]: {spec.num_samples} sample(s) of {len(spec.search_space)} key(s), "
                    f"{spec.search.algorithm}, scheduler {spec.scheduler.name}")
                with stops.tune_running():
                    grid = _experiment("search", output, base, shared, spec, _param_space(spec),
                                       _tune_config(spec, base), console, resume, quiet,
                                       stop=_budget(spec, output, base.train.rounds, len(baseline_rows)))
                if stops.requested:
                    raise SearchStopped(stops.signum, output, phase)
        except KeyboardInterrupt as stop:  # Abandon, or a blocking Ray call's plain copy of it
            raise SearchStopped(stops.signal_of(stop), output, phase, abandoned=stops.received > 1) from None
    elapsed = time.perf_counter() - started
    return _write_outputs(output, spec, base, grid, baseline_rows, elapsed, console)


def _param_space(spec: TuneSpec) -> dict[str, Any]:
    return {k: tune_domain(d) for k, d in spec.search_space.items()}


def _tune_config(spec: TuneSpec, base: ExperimentConfig) -> tune.TuneConfig:
    metric, mode = spec.scheduler_metric
    scheduler = _scheduler(spec, base.train.rounds)
    return tune.TuneConfig(
        num_samples=spec.num_samples, scheduler=scheduler, search_alg=_search_algorithm(spec),
        **({"metric": metric, "mode": mode} if scheduler is None and not spec.multi_objective
           and spec.search.algorithm not in ("optuna",) else {}),
    )


def _check_baseline(output: Path, rows: list[RoundRecord], rounds: int) -> None:
    """SetupError unless the baseline trained all its rounds: every saving is measured against it."""
    if len(rows) < rounds:
        raise SetupError(f"the FedAvg baseline in {output / 'baseline'} ended after {len(rows)} of {rounds} "
                         f"rounds (its trial errored; Tune's log is in {output / 'tune' / 'baseline'}); the search "
                         f"needs it whole: fix the cause and resume with apf-ray tune --resume {output}")


def _write_outputs(output: Path, spec: TuneSpec, base: ExperimentConfig, grid: Any,
                   baseline_rows: list[RoundRecord], elapsed: float, console: Console) -> dict[str, Any]:
    baseline_total = [total_bytes(h) for h in baseline_rows] or None
    baseline_accuracies = [h.test_accuracy for h in baseline_rows] or None
    trained = rounds_trained(output, len(baseline_rows))
    for run_dir in [output / "baseline", *sorted((output / "trials").glob("*"))]:
        if (run_dir / JOURNAL / "rounds.jsonl").is_file():
            write_tables(run_dir)  # trials a scheduler stopped early never wrote theirs
    rows = []
    for result in grid:
        if result.config is None or result.path is None:  # the compute budget ended the search before it started
            continue
        trial_id = Path(result.path).name  # trial_dirname_creator names it after the trial id
        params = sampled_params(result.config, spec)
        history = read_history(output / "trials" / trial_id)
        rows.append(_row(trial_id, _status(result, history, base.train.rounds), params, history, spec,
                         baseline_total, trained.get(trial_id, 0), baseline_accuracies))
    rows.sort(key=lambda r: r["trial_id"])
    base_row = _row("baseline", "completed", {}, baseline_rows, spec, baseline_total, trained[BASELINE_LEDGER],
                    baseline_accuracies) if baseline_rows else None
    spent = run_equivalents(trained, base.train.rounds)
    key = accuracy_key(spec)
    best = choose_best(rows, spec, base_row[key] if base_row else None)
    done = [i for i, r in enumerate(rows) if r.get(key) is not None and r["status"] == "completed"]
    front = [done[j] for j in pareto_front([(rows[i][key], rows[i]["bytes_total"]) for i in done])]
    table_rows = [{**r, "pareto": i in front, "best": i == best, "baseline": False} for i, r in enumerate(rows)]
    if base_row is not None:
        table_rows.append({**base_row, "pareto": False, "best": False, "baseline": True})
    columns = sorted({k for r in table_rows for k in r}, key=lambda k: (k.startswith("param:") is False, k))
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in table_rows]),
                   output / "trials.parquet")
    for row in rows:
        if row["status"] != "completed":
            _close_run_folder(output / "trials" / row["trial_id"], row["status"])
    save_figure(pareto_figure(rows, front, base_row, best,
                              f"{spec.name}: accuracy vs bytes ({base.train.rounds} rounds)", spec),
                output / "pareto.png")
    summary: dict[str, Any] = {
        "name": spec.name, "trials": len(rows), "search_time_s": elapsed,
        "rounds_trained": sum(trained.values()), "run_equivalents": spent,
        "statuses": {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "errored")},
        "baseline": _jsonable(base_row), "best": _jsonable(rows[best]) if best is not None else None,
        "pareto": [rows[i]["trial_id"] for i in front],
    }
    if best is not None:
        cfg = trial_config(base, {k.removeprefix("param:"): _decode(v) for k, v in rows[best].items()
                                  if k.startswith("param:")}, name=f"{spec.name}-best")
        raw = cfg.to_dict()
        raw["output"]["dir"] = None
        raw["train"]["eval_every"] = base.train.eval_every
        (output / "best.yaml").write_text(
            f"# best trial {rows[best]['trial_id']} of the search {spec.name} — run it with\n"
            f"#   apf-ray train --config {output / 'best.yaml'}\n" + yaml.safe_dump(raw, sort_keys=False))
    write_json(output / "summary.json", summary)
    console.print(_results_table(rows, spec, best))
    if base_row is not None:
        console.print(f"baseline (FedAvg): accuracy {base_row[key]:.4f}, "
                      f"{base_row['bytes_total'] / 1e6:.1f} MB")
    console.print(f"wrote {output / 'trials.parquet'}, {output / 'pareto.png'}"
                  + (f", {output / 'best.yaml'}" if best is not None else "")
                  + f"; search took {elapsed:.0f} s; tensorboard --logdir {output}")
    console.print(f"compute: {sum(trained.values())} rounds trained (trials and baseline) = {spent:.2f} "
                  f"run-equivalents of {base.train.rounds} rounds"
                  + (f" (budget {spec.max_run_equivalents:g})" if spec.max_run_equivalents else ""))
    if best is None and spec.constrained and rows:
        console.print(f"no completed trial is within {spec.max_accuracy_drop:g} of the baseline's accuracy: "
                      "no best.yaml")
    return summary


def _jsonable(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def resume_search(output: Path, *, address: str | None = None, verbose: bool = False, quiet: bool = False,
                  console: Console | None = None) -> dict[str, Any]:
    """Finish an interrupted search in ``output`` without redoing finished trials (nor its baseline).

    SetupError, before Ray starts, when ``output`` holds no search (a train run is named as one).
    """
    output = Path(output)
    check_search_folder(output)
    spec, base = read_search_record(output)
    return run_search(spec, base, output, address=address, resume=True, verbose=verbose, quiet=quiet,
                      console=console)


def read_search_record(output: Path) -> tuple[TuneSpec, ExperimentConfig]:
    """The spec and base config the search in ``output`` was started with (its search.json), both
    filled in by this version's models; SetupError naming the file if it holds no such record."""
    path = Path(output) / SEARCH_FILE
    try:
        saved = json.loads(path.read_text())
        return TuneSpec.model_validate(saved["spec"]), build_config(saved["base"], source=str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSON, pydantic and config errors are ValueErrors
        raise SetupError(f"{path} is not a search's record: {clip(describe(err))}") from None


__all__ = ["UNREACHED", "federated_trial", "read_search_record", "resume_search", "run_search", "tune_domain"]

