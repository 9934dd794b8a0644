"""A strategy defined outside apf_ray, plugged in by import path (``tests.plugins.median_strategy:Median``).

Coordinate-wise median of the client deltas, scaled by a step size of its own: one file,
its own options, no edits to the package.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apf_ray.records import RoundPlan
from apf_ray.strategies import Strategy


class Median(Strategy):
    name = "median"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        step: float = Field(1.0, gt=0, le=2, description="multiplier of the median delta")

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan(round=round_idx, sync_mask=None, train_mask=None)

    def aggregate(self, params, buffers, uploads):
        deltas = np.stack([u.update for u in uploads if u.update is not None])
        return params + np.float32(self.options.step) * np.median(deltas, axis=0).astype(np.float32), buffers
