"""GWPF-style freezing (Yang et al., "GWPF: Communication-efficient federated learning with
Gradient-Wise Parameter Freezing", Computer Networks 255, 2024): APF's published rival.

What is implemented, as the paper's summary describes the mechanism:

- **Freezing, on the server, from an EMA of gradient significance.** After each aggregated
  round the server measures every synchronised scalar's significance, its global update
  relative to its value, ``|Δw_i| / (|w_i| + FLOOR)`` (a unitless fraction per round), and
  keeps an exponential moving average of it (factor ``beta``, bias-corrected). A scalar
  observed at least ``min_rounds`` times whose average falls below ``threshold`` is frozen:
  it is neither uploaded nor aggregated, so the global model keeps its value.
- **Thawing, decided by the server from the clients' feedback.** Clients still train every
  scalar locally (their frozen scalars' changes are not sent) and accumulate, in their own
  state, the local change of each frozen scalar over the rounds they take part in. Each
  upload carries one bit per frozen scalar: whether that accumulated change, relative to
  the scalar's value, reaches ``thaw_threshold``. The server thaws a scalar when at least
  ``thaw_quorum`` of the round's valid uploads vote for it; a thawed scalar starts its
  significance average afresh. The bits are a ``thaw`` upload part (a wire bitmap,
  ``5 + ceil(frozen/8)`` bytes), counted in the uplink bytes.

Where it differs from the paper: the votes are checked every round rather than at the end
of per-scalar frozen periods (a scalar stays frozen while too few clients vote for it, which
is the paper's "extend the frozen period"); significance is the relative size of the global
update, not of raw gradients (the server sees updates only); the accumulated frozen-scalar
changes only feed the votes — they are not applied at thawing. Per-client state: one float32
per model scalar (the accumulated changes), while any scalar is frozen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from apf_ray import wire
from apf_ray.records import RoundPlan
from apf_ray.strategies.base import DecodedUpload, Strategy, frame_upload, register_strategy

FLOOR = 1e-3
"""Added to ``|w_i|`` in both significance measures, so scalars near zero are not all significant."""

ACCUMULATED = "gwpf_frozen_change"
"""The client-state key of the accumulated local change of the frozen scalars."""


def relative_change(change: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``|change| / (|values| + FLOOR)``: a change as a fraction of the value it changes."""
    return np.abs(change) / (np.abs(values) + np.float32(FLOOR))


@register_strategy
class GWPF(Strategy):
    name = "gwpf"
    upload_parts = frozenset({"thaw"})

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")
        threshold: float = Field(0.01, gt=0, le=1, description="freeze below this EMA of relative update per round")
        beta: float = Field(0.9, ge=0, lt=1, description="EMA factor of the significance")
        min_rounds: int = Field(3, ge=1, description="observations of a scalar before it may freeze")
        thaw_threshold: float = Field(0.05, gt=0, description="a client votes to thaw at this accumulated "
                                      "relative change")
        thaw_quorum: float = Field(0.5, gt=0, le=1, description="fraction of a round's uploads that thaws a scalar")

    def setup(self, init_params: np.ndarray) -> None:
        super().setup(init_params)
        self._prev = init_params.copy()
        self._ema = np.zeros(init_params.size, dtype=np.float32)
        self._seen = np.zeros(init_params.size, dtype=np.int64)
        self._active = np.ones(init_params.size, dtype=bool)
        self._thaw = np.zeros(init_params.size, dtype=bool)

    def plan(self, round_idx: int) -> RoundPlan:
        mask = None if self._active.all() else self._active.copy()
        return RoundPlan(round=round_idx, sync_mask=mask, train_mask=None)

    def decode_upload(self, plan: RoundPlan, client_id: int, buf: np.ndarray) -> DecodedUpload:
        up = super().decode_upload(plan, client_id, buf)
        frozen = 0 if plan.sync_mask is None else int(plan.sync_mask.size - np.count_nonzero(plan.sync_mask))
        if up.values is not None and frozen:
            if "thaw" not in up.parts:
                raise ValueError(f"upload lacks the 'thaw' votes for the {frozen} frozen scalars")
            votes = wire.decode_mask(up.parts["thaw"])
            if votes.size != frozen:
                raise ValueError(f"upload holds {votes.size} thaw votes, the round froze {frozen} scalars")
        return up

    def tally_upload(self, upload: DecodedUpload) -> dict[str, np.ndarray]:
        """A voting upload's thaw votes (one per frozen scalar) and one voter; summed on the way in."""
        if "thaw" not in upload.parts:
            return {}
        return {"thaw_votes": wire.decode_mask(upload.parts["thaw"]), "thaw_voters": np.ones(1, np.int64)}

    def observe_tallies(self, tallies: dict[str, np.ndarray]) -> None:
        """Thaw the frozen scalars that at least ``thaw_quorum`` of the voting uploads vote for."""
        frozen = np.flatnonzero(~self._active)
        voters = int(tallies["thaw_voters"][0]) if "thaw_voters" in tallies else 0
        if not frozen.size or not voters:
            return
        self._thaw[frozen[tallies["thaw_votes"] >= self.options.thaw_quorum * voters]] = True

    def observe(self, params: np.ndarray) -> None:
        """Update the significance average of the synchronised scalars; freeze and thaw."""
        o = self.options
        active = self._active
        significance = relative_change(params[active] - self._prev[active], self._prev[active])
        self._ema[active] = o.beta * self._ema[active] + (1 - o.beta) * significance
        self._seen[active] += 1
        corrected = self._ema / (1 - np.power(o.beta, np.maximum(self._seen, 1)))
        freeze = active & (self._seen >= o.min_rounds) & (corrected < o.threshold)
        self._active = (active & ~freeze) | self._thaw
        self._ema[self._thaw] = 0.0
        self._seen[self._thaw] = 0
        self._thaw[:] = False
        self._prev = params.copy()

    @property
    def sync_mask(self) -> np.ndarray | None:
        return None if self._active.all() else self._active

    @property
    def threshold(self) -> float:
        return float(self.options.threshold)

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self._prev, "ema": self._ema, "seen": self._seen, "active": self._active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._prev = np.asarray(state["prev"], dtype=np.float32).copy()
        self._ema = np.asarray(state["ema"], dtype=np.float32).copy()
        self._seen = np.asarray(state["seen"], dtype=np.int64).copy()
        self._active = np.asarray(state["active"], dtype=bool).copy()
        self._thaw = np.zeros(self._active.size, dtype=bool)

    # ---- client half -------------------------------------------------------------------
    def encode_upload(self, plan, global_params, local_params, buffers, num_samples, loss, client_state):
        """The synchronised delta through the uplink chain, plus one thaw vote per frozen scalar."""
        values = self.upload_values(plan, global_params, local_params, client_state)
        if plan.sync_mask is None:
            client_state.pop(ACCUMULATED, None)
            return frame_upload(values, buffers, num_samples, loss)
        frozen = ~plan.sync_mask
        previous = client_state.get(ACCUMULATED)  # read-only when it came through Ray's object store
        accumulated = np.zeros(global_params.size, np.float32) if previous is None else np.array(previous)
        accumulated[plan.sync_mask] = 0.0  # thawed or never frozen: nothing accumulated
        accumulated[frozen] += local_params[frozen] - global_params[frozen]
        client_state[ACCUMULATED] = accumulated
        votes = relative_change(accumulated[frozen], global_params[frozen]) >= self.options.thaw_threshold
        return frame_upload(values, buffers, num_samples, loss, {"thaw": wire.encode_mask(votes)})
