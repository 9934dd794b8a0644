"""The two strawmen APF is measured against (paper Figs. 5–6)."""

from __future__ import annotations

import numpy as np

from apf_ray.records import RoundPlan
from apf_ray.strategies.apf import APF, FreezingOptions
from apf_ray.strategies.base import register_strategy


@register_strategy
class PermanentFreezing(APF):
    """Once stable, frozen forever: loses accuracy on temporarily stable scalars."""

    name = "permanent"
    Options = FreezingOptions

    @property
    def period_policy(self) -> str:
        return "permanent"


@register_strategy
class PartialSync(APF):
    """Stable scalars are not sent, but keep training locally.

    Each client keeps its own values at unsynchronised positions, so clients drift apart
    on non-IID data — the failure mode APF's freezing avoids.
    """

    name = "partial_sync"

    def plan(self, round_idx: int) -> RoundPlan:
        p = super().plan(round_idx)
        return RoundPlan(round=round_idx, sync_mask=p.sync_mask, train_mask=None)

    def start_params(self, plan: RoundPlan, global_params: np.ndarray, client_state: dict) -> np.ndarray:
        local = client_state.get("local")
        if plan.sync_mask is None or local is None:
            return global_params
        return np.where(plan.sync_mask, global_params, local)

    def encode_upload(self, plan, global_params, local_params, buffers, num_samples, loss, client_state):
        client_state["local"] = local_params.copy()
        return super().encode_upload(plan, global_params, local_params, buffers, num_samples, loss, client_state)
