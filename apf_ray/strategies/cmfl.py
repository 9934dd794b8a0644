"""CMFL: a client whose update disagrees in sign with the last global update does not upload."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apf_ray import wire
from apf_ray.records import RoundPlan
from apf_ray.strategies.base import Strategy, frame_upload, register_strategy


@register_strategy
class CMFL(Strategy):
    """Relevance = the fraction of scalars whose update sign agrees with the last global update.

    The sign of the previous global update travels to clients as two bitmaps (sign, nonzero;
    n/8 bytes each, counted in the downlink). A skipping client still reports (it counts
    towards the quorum) but is left out of the average; its upload carries its relevance,
    which the server records in the client's row of ``clients.parquet`` (``error``).
    """

    name = "cmfl"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        threshold: float = Field(0.5, ge=0, le=1, description="min sign agreement with the last global update")

    def setup(self, init_params: np.ndarray) -> None:
        super().setup(init_params)
        self._prev = init_params.copy()
        self._last_update: np.ndarray | None = None

    def plan(self, round_idx: int) -> RoundPlan:
        extras = {}
        if self._last_update is not None:
            extras["sign"] = wire.encode_mask(self._last_update > 0)
            extras["nonzero"] = wire.encode_mask(self._last_update != 0)
        return RoundPlan(round=round_idx, sync_mask=None, train_mask=None, extras=extras)

    def observe(self, params: np.ndarray) -> None:
        self._last_update = params - self._prev
        self._prev = params.copy()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"prev": self._prev}
        if self._last_update is not None:
            state["last_update"] = self._last_update
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._prev = np.asarray(state["prev"], dtype=np.float32).copy()
        last = state.get("last_update")
        self._last_update = None if last is None else np.asarray(last, dtype=np.float32).copy()

    def encode_upload(self, plan, global_params, local_params, buffers, num_samples, loss, client_state):
        if "sign" in plan.extras:
            update = local_params - global_params
            positive = wire.decode_mask(plan.extras["sign"])
            nonzero = wire.decode_mask(plan.extras["nonzero"])
            considered = nonzero & (update != 0)
            agree = (update > 0) == positive
            relevance = float(agree[considered].mean()) if considered.any() else 1.0
            if relevance < self.options.threshold:
                return frame_upload(None, np.zeros(0, np.float32), num_samples, loss, skipped=1.0,
                                    relevance=relevance)
        return super().encode_upload(plan, global_params, local_params, buffers, num_samples, loss, client_state)
