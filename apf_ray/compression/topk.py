"""Top-k sparsification (with error feedback, kept by the uplink chain on the client)."""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apf_ray.compression.base import Sparsifier, register_stage


@register_stage
class TopK(Sparsifier):
    """Send the k = max(1, ceil(ratio·m)) scalars with the largest |update + residual|.

    Ties at the k-th magnitude go to the lowest positions, so the choice is deterministic.
    """

    name = "topk"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        ratio: float = Field(0.1, gt=0, le=1, description="fraction of the synchronised scalars sent per upload")

    def k(self, m: int) -> int:
        # round() keeps e.g. 0.07 * 100 = 7.000000000000001 from becoming 8.
        return min(m, max(1, math.ceil(round(self.options.ratio * m, 9))))

    def select(self, corrected: np.ndarray, weights: np.ndarray, round_index: int) -> np.ndarray:
        m = corrected.size
        k = self.k(m)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        magnitude = np.abs(corrected)
        kth = np.partition(magnitude, m - k)[m - k]
        selected = magnitude > kth
        ties = np.flatnonzero(magnitude == kth)[: k - np.count_nonzero(selected)]
        selected[ties] = True
        return np.flatnonzero(selected)
