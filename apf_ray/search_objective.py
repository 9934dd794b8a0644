"""A search's compute, counted honestly, and its constrained objective (Ray-free).

**Run-equivalents.** A search's cost is the rounds it trained — by every trial, the ones a
scheduler stopped early included, plus the FedAvg baseline's — divided by the rounds of one
run. Eight run-equivalents cost what eight full runs cost, whatever the searcher did with them.
Each trial appends one line per round it trains to its ledger, ``compute/<trial id>.jsonl`` in
the search's folder (``{"round": r, "t": unix seconds}``); a ledger is only ever appended to,
so rounds a trial trained and then lost (a failure before its next checkpoint, a PBT exploit
that replaced its run with a donor's) still count.

**The constrained objective** (``metric: constrained_saving``): the saving of total bytes
(uplink + downlink) against the baseline *at the same round*, subject to the accuracy gap at
that round — the baseline's mean of its last ``last_n`` evaluated accuracies minus the
trial's — being at most ``max_accuracy_drop``. A feasible round scores its saving (a fraction,
at least :data:`INFEASIBLE` since no setting sends three times FedAvg's bytes); an infeasible
one scores :data:`INFEASIBLE` minus its excess gap, below every feasible score and better the
closer it is to feasible. Any scheduler can so compare trials at any round, and a searcher that
takes constraints (Optuna's TPE) receives the excess gap itself as the constraint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from apf_ray.derived import mean_of_last

LEDGER_DIR = "compute"
"""The folder of a search that holds one round ledger per trial (and one for the baseline)."""

BASELINE_LEDGER = "baseline"
"""The baseline's ledger name (trial ids are Tune's, never this word)."""

INFEASIBLE = -2.0
"""The score of a round just outside the accuracy constraint; feasible rounds score their saving,
which is above this unless the trial sent three times the baseline's bytes."""


def ledger_path(output: Path, trial: str) -> Path:
    """The round ledger of ``trial`` (a Tune trial id, or :data:`BASELINE_LEDGER`) in a search folder."""
    return Path(output) / LEDGER_DIR / f"{trial}.jsonl"


def record_round(path: Path, round_number: int) -> None:
    """Append one trained round to a ledger (one short line: appends from two processes never interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"round": round_number, "t": time.time()}) + "\n")


def read_ledgers(output: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ledger of a search folder: name → [(round, unix seconds)] in the order trained."""
    ledgers = {}
    for path in sorted((Path(output) / LEDGER_DIR).glob("*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ledgers[path.stem] = [(int(e["round"]), float(e["t"])) for e in lines]
    return ledgers


def rounds_trained(output: Path, baseline_rounds: int = 0) -> dict[str, int]:
    """Rounds trained per trial, and by the baseline: at least ``baseline_rounds`` (a baseline
    copied into the folder from an earlier search trained its rounds there, not here, and still
    counts — it is part of what this search's savings cost)."""
    counts = {name: len(lines) for name, lines in read_ledgers(output).items()}
    counts[BASELINE_LEDGER] = max(counts.get(BASELINE_LEDGER, 0), baseline_rounds)
    return counts


def run_equivalents(rounds_by_trial: Mapping[str, int], rounds_per_run: int) -> float:
    """All rounds trained (the baseline's included) in units of one run of ``rounds_per_run`` rounds."""
    return sum(rounds_by_trial.values()) / rounds_per_run


def constraint_excess(accuracies: Sequence[float], baseline_accuracies: Sequence[float], last_n: int,
                      max_drop: float) -> float:
    """How far the accuracy gap exceeds ``max_drop`` at the trial's latest round (fractions of the
    test set; ≤ 0: feasible). Both accuracies are means of the last ``last_n`` evaluations up to
    that round; ``baseline_accuracies[r-1]`` is the baseline's at round r."""
    rounds = len(accuracies)
    gap = mean_of_last(baseline_accuracies[:rounds], last_n) - mean_of_last(accuracies, last_n)
    return gap - max_drop


def constrained_score(saving: float, excess: float) -> float:
    """The constrained objective of one round: its saving if feasible (``excess`` ≤ 0), else
    :data:`INFEASIBLE` − ``excess``. Feasible savings are floored at :data:`INFEASIBLE`, so every
    feasible round outranks every infeasible one."""
    return max(saving, INFEASIBLE) if excess <= 0 else INFEASIBLE - excess


def finished_within(budget: float, ledgers: Mapping[str, Sequence[tuple[int, float]]], rounds_per_run: int,
                    baseline_rounds: int) -> set[str]:
    """The trials that had trained all ``rounds_per_run`` rounds when the search had spent ``budget``
    run-equivalents (its baseline's ``baseline_rounds`` counted first): what a search stopped then
    could have chosen from. Rounds are ordered by when they were trained, across trials."""
    allowance = budget * rounds_per_run - baseline_rounds
    trained = sorted((t, name) for name, lines in ledgers.items() if name != BASELINE_LEDGER for _, t in lines)
    if allowance < 1:
        return set()
    cutoff = trained[int(allowance) - 1][0] if int(allowance) <= len(trained) else math.inf
    return {name for name, lines in ledgers.items() if name != BASELINE_LEDGER
            and any(r >= rounds_per_run and t <= cutoff for r, t in lines)}


__all__ = ["BASELINE_LEDGER", "INFEASIBLE", "LEDGER_DIR", "constrained_score", "constraint_excess",
           "finished_within", "ledger_path", "read_ledgers", "record_round", "rounds_trained",
           "run_equivalents"]
