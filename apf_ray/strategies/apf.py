"""Adaptive Parameter Freezing: frozen scalars are neither trained nor sent (SPEC §2–§3)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from apf_ray.controller import APFController, PeriodPolicy
from apf_ray.records import RoundPlan
from apf_ray.strategies.base import Strategy, register_strategy


class FreezingOptions(BaseModel):
    """The controller's knobs (SPEC §2; defaults from the authors' code)."""

    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(0.99, ge=0, lt=1, description="EMA factor of the effective perturbation")
    threshold: float = Field(0.05, gt=0, le=1, description="stability threshold T on P = |E|/A")
    tighten_ratio: float = Field(0.8, gt=0, le=1, description="halve T when this fraction is frozen")
    threshold_min: float = Field(1e-4, gt=0, le=1, description="floor of T under tightening")
    check_every: int = Field(1, ge=1, description="rounds between stability checks (Fc)")
    aggressive_prob: float = Field(0.0, ge=0, le=1, description="p: freeze an unstable scalar for one check")

    @model_validator(mode="after")
    def _floor_below_threshold(self) -> FreezingOptions:
        if self.threshold_min > self.threshold:
            raise ValueError(f"threshold_min ({self.threshold_min}) must be ≤ threshold ({self.threshold})")
        return self


class APFOptions(FreezingOptions):
    period_policy: str = Field("aimd", description="aimd, additive, multiplicative, permanent or fixed:N")

    @field_validator("period_policy")
    @classmethod
    def _known_policy(cls, spec: str) -> str:
        PeriodPolicy.parse(spec)  # the controller's own rule; its ValueError names the choices
        return spec


@register_strategy
class APF(Strategy):
    """The controller runs on the aggregated global vector, so there is exactly one mask."""

    name = "apf"
    Options = APFOptions

    @property
    def period_policy(self) -> str:
        return self.options.period_policy

    def setup(self, init_params: np.ndarray) -> None:
        super().setup(init_params)
        o = self.options
        self.controller = APFController(
            init_params, alpha=o.alpha, threshold=o.threshold, tighten_ratio=o.tighten_ratio,
            threshold_min=o.threshold_min, check_every=o.check_every, aggressive_prob=o.aggressive_prob,
            period_policy=self.period_policy, seed=self.seed,
        )
        self._mask = np.ones(init_params.size, dtype=bool)

    def plan(self, round_idx: int) -> RoundPlan:
        mask = None if self._mask.all() else self._mask.copy()
        return RoundPlan(round=round_idx, sync_mask=mask, train_mask=mask)

    def observe(self, params: np.ndarray) -> None:
        self._mask = np.asarray(self.controller.update(params), dtype=bool).copy()

    @property
    def sync_mask(self) -> np.ndarray | None:
        return None if self._mask.all() else self._mask

    @property
    def threshold(self) -> float:
        return float(self.controller.threshold)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "configured_threshold": self.options.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the controller (ref, E, A, periods, current T, RNG).

        If the configured threshold differs from the one the state was saved under (a search
        mutated it, e.g. a PBT exploit), the new value replaces the current, possibly
        tightened, T; every other knob (α, p, Φ, ...) comes from the options anyway.
        """
        self.controller.load_state_dict(state["controller"])
        if state.get("configured_threshold", self.options.threshold) != self.options.threshold:
            self.controller.set_threshold(self.options.threshold)
        self._mask = self.controller.active
