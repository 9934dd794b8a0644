"""Derived metrics have one definition, and Tune, compare and the reproduction report all use it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from apf_ray.derived import (
    Reached,
    accuracy_gap,
    best_accuracy,
    bytes_to_target,
    final_accuracy,
    mean_of_last_accuracies,
    saving,
    saving_at_round,
    smoothed_accuracy,
    total_bytes,
)
from apf_ray.records import RoundRecord
from apf_ray.tuning import UNREACHED, TuneSpec, round_metrics


def _history(accuracies: list[float | None], up: int = 100, down: int = 50) -> list[RoundRecord]:
    """Rounds 1..n spending ``up`` and ``down`` bytes each; None: the round was not evaluated."""
    return [RoundRecord(round=r, test_accuracy=acc, test_loss=None if acc is None else 1.0 - acc, train_loss=0.5,
                        bytes_up=up, bytes_down=down, cum_bytes_up=r * up, cum_bytes_down=r * down,
                        frozen_fraction=0.0, threshold=None, clients_sampled=3, clients_reported=3,
                        clients_dropped=0, wall_s=0.1, simulated_s=1.0, cum_simulated_s=float(r))
            for r, acc in enumerate(accuracies, start=1)]


def test_the_smoothed_accuracy_is_a_trailing_mean_whose_last_value_is_the_mean_of_the_last_n():
    accs = [0.1, 0.3, 0.5, 0.7, 0.2]
    assert smoothed_accuracy(accs, 2).tolist() == [0.1, (0.1 + 0.3) / 2, (0.3 + 0.5) / 2, (0.5 + 0.7) / 2,
                                                   (0.7 + 0.2) / 2]
    for n in (1, 3, 5, 9):
        assert smoothed_accuracy(accs, n)[-1] == mean_of_last_accuracies(_history(accs), n)
    with pytest.raises(ValueError, match="at least 1"):
        smoothed_accuracy(accs, 0)


def test_the_final_best_and_last_n_accuracies_are_of_evaluated_rounds():
    history = _history([0.2, None, 0.4, None, 0.6, None])
    assert mean_of_last_accuracies(history, 1) == 0.6
    assert mean_of_last_accuracies(history, 2) == (0.4 + 0.6) / 2
    assert mean_of_last_accuracies(history, 10) == (0.2 + 0.4 + 0.6) / 3
    assert mean_of_last_accuracies(_history([None, None]), 3) is None
    assert final_accuracy(history) == 0.6 and best_accuracy(_history([0.3, 0.8, 0.5, None])) == 0.8
    assert final_accuracy(_history([None])) is None and best_accuracy([]) is None


def test_bytes_to_target_is_the_first_evaluated_round_reaching_it_raw_or_smoothed():
    history = _history([0.5, None, 0.9, 0.6, 0.85, 0.95])
    assert bytes_to_target(history, 0.8) == Reached(round=3, bytes_up=300, bytes_total=450)
    # smoothed over 2 evaluations: 0.5, 0.7, 0.75, 0.725, 0.9 -> round 6 (the 5th evaluation)
    assert bytes_to_target(history, 0.8, smoothing=2) == Reached(round=6, bytes_up=600, bytes_total=900)
    assert bytes_to_target(history, 0.99) is None
    assert bytes_to_target(_history([None]), 0.1) is None


def test_savings_and_gaps_against_a_baseline():
    assert saving(25, 100) == 0.75 and saving(150, 100) == -0.5
    assert saving(None, 100) is None and saving(10, None) is None and saving(10, 0) is None
    rec = _history([0.5, 0.5, 0.5])[-1]  # round 3: 450 bytes in all
    assert total_bytes(rec) == 450
    assert saving_at_round(rec, [300, 600, 900]) == 0.5  # the baseline's bytes at round 3, not its last
    assert saving_at_round(rec, [300, 600]) is None and saving_at_round(rec, None) is None
    assert accuracy_gap(0.9, 0.95) == pytest.approx(-0.05) and accuracy_gap(None, 0.9) is None


def _spec(**extra) -> TuneSpec:
    return TuneSpec.model_validate({"base": {}, "objective": [{"metric": "accuracy", "last_n": 2},
                                                              {"metric": "bytes_total"}],
                                    "search": {"algorithm": "optuna_nsga2"}, "target_accuracy": 0.8,
                                    "search_space": {"strategy.options.threshold": {"uniform": [0.1, 0.5]}},
                                    **extra})


def test_tune_reports_the_derived_numbers():
    history = _history([0.5, 0.9, 0.7])
    out = round_metrics(history, _spec(), [300, 600, 1800])
    assert out["accuracy_last2"] == mean_of_last_accuracies(history, 2)
    assert out["bytes_to_target"] == bytes_to_target(history, 0.8).bytes_total == 300
    assert out["saving"] == saving_at_round(history[-1], [300, 600, 1800]) == 0.75
    assert "saving" not in round_metrics(history, _spec(), [300, 600])  # the baseline stopped before round 3


def test_tune_reports_a_loss_that_overflowed_as_unreached_not_a_crash():
    """The server records a test loss that overflowed float64 as None (server.py); Tune's report
    needs a finite number for every metric, so it gets the same stand-in as an unreached target."""
    history = _history([0.5, 0.6])
    history[-1] = dataclasses.replace(history[-1], test_loss=None)
    out = round_metrics(history, _spec(), None)
    assert out["test_loss"] == UNREACHED and all(np.isfinite(v) for v in out.values())
    assert out["accuracy"] == 0.6


def test_a_trials_row_holds_the_derived_numbers():
    from actors.tune import _row

    history = _history([0.5, None, 0.9, 0.7])
    row = _row("t_00000", "completed", {}, history, _spec(), [300, 600, 900, 1800], trained=4)
    assert row["accuracy_last2"] == mean_of_last_accuracies(history, 2) == (0.9 + 0.7) / 2
    assert row["bytes_to_target"] == bytes_to_target(history, 0.8).bytes_total == 450
    assert row["saving"] == saving_at_round(history[-1], [300, 600, 900, 1800]) == 1 - 600 / 1800
    assert row["bytes_total"] == total_bytes(history[-1]) and row["final_accuracy"] == 0.7
    assert row["rounds_trained"] == 4
