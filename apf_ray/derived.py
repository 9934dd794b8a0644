"""Derived metrics: the numbers computed from a run's round records, each defined once.

Tune's per-round report and its trial table (:mod:`apf_ray.tuning`, ``actors/tune.py``), the
``compare`` table (:mod:`apf_ray.report`), the reproduction's analysis and the benchmarks all
call these functions, so "bytes to target" or "saving" means one thing wherever it is printed.

Units: bytes are cumulative wire bytes after a round (uplink + downlink unless the name says
otherwise); accuracy is the fraction of the test set classified correctly, in [0, 1]; a saving
is a fraction of the baseline's amount (0.6: 60 % less than the baseline); an accuracy gap is a
difference of accuracies (−0.005: half a point below the baseline); rounds count from 1.

Rounds that were not evaluated (``test_accuracy`` None, see ``train.eval_every``) are skipped
by every accuracy metric; "the last n accuracies" are the last n *evaluated* rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from apf_ray.records import RoundRecord


def total_bytes(rec: RoundRecord) -> int:
    """Cumulative uplink + downlink bytes of the run after round ``rec.round``."""
    return rec.cum_bytes_up + rec.cum_bytes_down


def evaluated(history: Sequence[RoundRecord]) -> list[RoundRecord]:
    """The records of the rounds that were evaluated (their accuracy is known), in order."""
    return [h for h in history if h.test_accuracy is not None]


def final_accuracy(history: Sequence[RoundRecord]) -> float | None:
    """Test accuracy (fraction) of the last evaluated round; None before the first evaluation."""
    evals = evaluated(history)
    return evals[-1].test_accuracy if evals else None


def best_accuracy(history: Sequence[RoundRecord]) -> float | None:
    """The highest test accuracy (fraction) of any evaluated round; None before the first evaluation."""
    accs = [h.test_accuracy for h in evaluated(history)]
    return max(accs) if accs else None


def smoothed_accuracy(accuracies: Sequence[float], k: int) -> np.ndarray:
    """Trailing mean of the last ``k`` values at each position (fewer at the start), as float64.

    Accuracy on non-IID splits jumps from round to round; comparisons smooth it this way. Each
    window is summed in order and divided by its length, so the last entry equals
    :func:`mean_of_last_accuracies` exactly.
    """
    if k < 1:
        raise ValueError(f"smoothing window must be at least 1 evaluation, got {k}")
    values = [float(a) for a in accuracies]
    return np.array([_mean(values[max(0, i + 1 - k):i + 1]) for i in range(len(values))], dtype=np.float64)


def mean_of_last(values: Sequence[float], n: int) -> float:
    """Mean of the last ``n`` values (all of them if fewer; at least one), summed in order."""
    if n < 1:
        raise ValueError(f"n must be at least 1 evaluation, got {n}")
    return _mean(list(values)[-n:])


def mean_of_last_accuracies(history: Sequence[RoundRecord], n: int) -> float | None:
    """Mean test accuracy (fraction) of the last ``n`` evaluated rounds (all of them if fewer);
    None before the first evaluation. ``n = 1`` is the final accuracy."""
    accs = [h.test_accuracy for h in evaluated(history)]
    return mean_of_last(accs, n) if accs else None


@dataclass(frozen=True)
class Reached:
    """Where a run first reached a target accuracy: the round (from 1) and its cumulative bytes."""

    round: int
    bytes_up: int
    bytes_total: int


def bytes_to_target(history: Sequence[RoundRecord], target: float, smoothing: int = 1) -> Reached | None:
    """The first evaluated round whose accuracy, smoothed over the last ``smoothing`` evaluations
    (:func:`smoothed_accuracy`; 1: the round's own accuracy), is ≥ ``target`` (a fraction), with
    the cumulative bytes spent by the end of that round; None if no round reached it."""
    evals = evaluated(history)
    smooth = smoothed_accuracy([h.test_accuracy for h in evals], smoothing)
    hit = np.flatnonzero(smooth >= target)
    if hit.size == 0:
        return None
    rec = evals[int(hit[0])]
    return Reached(rec.round, rec.cum_bytes_up, total_bytes(rec))


def saving(value: float | None, baseline: float | None) -> float | None:
    """``1 − value / baseline``: the fraction of the baseline's amount (bytes, seconds) not spent;
    negative when ``value`` is larger. None when either is missing or the baseline is 0."""
    if value is None or not baseline:
        return None
    return 1.0 - value / baseline


def saving_at_round(rec: RoundRecord, baseline_totals: Sequence[int] | None) -> float | None:
    """The saving of total bytes against the baseline *at the same round*: ``baseline_totals[r − 1]``
    is the baseline's cumulative uplink + downlink after round r. None without a baseline, or
    when the baseline has not reached round ``rec.round``."""
    if not baseline_totals or rec.round > len(baseline_totals):
        return None
    return saving(total_bytes(rec), baseline_totals[rec.round - 1])


def accuracy_gap(accuracy: float | None, baseline: float | None) -> float | None:
    """``accuracy − baseline`` (fractions; negative: below the baseline), or None if either is missing."""
    if accuracy is None or baseline is None:
        return None
    return accuracy - baseline


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
