"""Ray's OptunaSearch, with the accuracy constraint handed to Optuna's sampler.

A ``constrained_saving`` search (:mod:`apf_ray.search_objective`) wants TPE to model feasible
and infeasible settings apart: Optuna's TPE ranks a trial whose constraint is positive below
every feasible one, and among infeasible ones by how far they are out. Ray's ``OptunaSearch``
tells Optuna only the objective value, and Optuna 5 deprecates the sampler's
``constraints_func`` for ``Trial.set_constraint``; this searcher sets the trial's constraint
(``accuracy_excess`` of its last result: the accuracy gap beyond ``max_accuracy_drop``) just
before Ray tells Optuna the trial's value. A trial that ended without one (it errored) is told
as failed, as Ray does, so it carries no constraint.

Tune pickles it like any OptunaSearch (its study, sampler and these trials travel with it).
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch

CONSTRAINT = "accuracy_excess"
"""The result key holding the constraint value (≤ 0: feasible), reported by every round."""


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that sets each finished trial's Optuna constraint from its last result."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        trial = self._ot_trials.get(trial_id)
        if trial is not None and trial_id not in self._completed_trials and result and CONSTRAINT in result:
            trial.set_constraint(CONSTRAINT, float(result[CONSTRAINT]))
        super().on_trial_complete(trial_id, result, error)


__all__ = ["CONSTRAINT", "ConstrainedOptunaSearch"]
