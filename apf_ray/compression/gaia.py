"""Gaia's significance filter (Hsieh et al., NSDI'17) as an uplink sparsifier."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from apf_ray.compression.base import Sparsifier, register_stage


@register_stage
class Gaia(Sparsifier):
    """Send scalar j iff |Δ_j| > t(r)·|w_j|, i.e. its update is significant relative to its value.

    Δ includes the residual of earlier rounds (error feedback). The threshold decays per
    round with a floor: t(r) = max(min_threshold, threshold · decay**r), r = 0, 1, … Gaia
    starts at 1% and lowers it as training converges; with the defaults (1%, ×0.99 per round,
    floor 0.1%) the floor is reached after 230 rounds.
    """

    name = "gaia"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        threshold: float = Field(0.01, gt=0, description="initial significance |Δ/w|")
        decay: float = Field(0.99, gt=0, le=1, description="threshold multiplier per round")
        min_threshold: float = Field(1e-3, ge=0, description="floor of the threshold")

        @model_validator(mode="after")
        def _floor_below_start(self) -> Gaia.Options:
            if self.min_threshold > self.threshold:
                raise ValueError(f"min_threshold ({self.min_threshold}) must be ≤ threshold ({self.threshold})")
            return self

    def threshold_at(self, round_index: int) -> float:
        """Significance threshold (a fraction of |w|) in round ``round_index`` (0-based)."""
        o = self.options
        return max(o.min_threshold, o.threshold * o.decay**round_index)

    def select(self, corrected: np.ndarray, weights: np.ndarray, round_index: int) -> np.ndarray:
        # |Δ| > t·|w| is |Δ/w| > t without dividing; for w == 0 it means Δ != 0.
        return np.flatnonzero(np.abs(corrected) > np.float32(self.threshold_at(round_index)) * np.abs(weights))
