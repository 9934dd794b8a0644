"""Plug-in strategies that exercise the contract from outside the package.

``DenseMean`` overrides ``aggregate`` with its own unweighted mean of the dense deltas, as a
user's plug-in would, never looking at ``defence.aggregation``; ``HalfPlans`` chooses its
own clients and gives each a plan of its own (even ids synchronise the first half of the
model, odd ids the second, nobody the last scalar) and counts its rounds in client state.
"""

from __future__ import annotations

import numpy as np

from apf_ray.records import RoundPlan
from apf_ray.strategies import Strategy

CHOSEN = [0, 1, 4]
"""The clients ``HalfPlans`` trains every round."""


class DenseMean(Strategy):
    name = "dense_mean"

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan(round=round_idx, sync_mask=None, train_mask=None)

    def aggregate(self, params, buffers, uploads):
        deltas = np.stack([u.update for u in uploads if u.update is not None])
        return params + deltas.mean(axis=0, dtype=np.float32), buffers


class HalfPlans(Strategy):
    name = "half_plans"

    def select_clients(self, rng, num_clients, k):
        return CHOSEN

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan(round=round_idx, sync_mask=None, train_mask=None)

    def client_plan(self, plan: RoundPlan, client_id: int) -> RoundPlan:
        mask = np.zeros(self.num_params, dtype=bool)
        half = self.num_params // 2
        if client_id % 2:
            mask[half:-1] = True
        else:
            mask[:half] = True
        return RoundPlan(round=plan.round, sync_mask=mask, train_mask=mask)

    def new_client_state(self, client_id: int) -> dict:
        return {"rounds": 0, "num_params": self.num_params}  # set by setup_client in the host

    def start_params(self, plan, global_params, client_state):
        client_state["rounds"] += 1
        return global_params
