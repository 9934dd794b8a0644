"""FedAvg: every scalar, every round — the baseline every saving is measured against."""

from __future__ import annotations

from apf_ray.records import RoundPlan
from apf_ray.strategies.base import Strategy, register_strategy


@register_strategy
class FedAvg(Strategy):
    name = "fedavg"

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan(round=round_idx, sync_mask=None, train_mask=None)
