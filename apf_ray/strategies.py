"""Strategies: what the server sends, what a client uploads, and how uploads are aggregated.

A strategy is split in two on purpose:

* the **server half** (``setup``, ``plan``, ``aggregate``, ``observe``, state) owns the APF
  controller or a baseline's server state and runs only on the server;
* the **client half** (``encode_upload``) is a pure function of the strategy config, the
  round plan and the client's own small state (residuals), so client actors can build the
  strategy from its config without the controller's memory.

Uploads are model *deltas* (local − global) encoded by :mod:`apf_ray.codec` into one wire
buffer per client; aggregation adds the sample-weighted mean delta to the global vector.
A scalar that no client sent gets exactly ``+0.0`` and therefore stays bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apf_ray import codec
from apf_ray.config import StrategyConfig
from apf_ray.controller import APFController
from apf_ray.training import weighted_mean


@dataclass
class RoundPlan:
    """What every client of one round receives besides the model."""

    round: int
    mask: np.ndarray | None  # scalars synchronised this round (None = all)
    train_mask: np.ndarray | None  # scalars clients may train (None = all)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # encoded strategy side data

    @property
    def extra_nbytes(self) -> int:
        return sum(int(v.nbytes) for v in self.extras.values())


@dataclass
class DecodedUpload:
    client_id: int
    update: np.ndarray | None  # dense float32 delta, 0 where nothing was sent; None if skipped
    buffers: np.ndarray | None
    num_samples: int
    loss: float
    nbytes: int  # wire bytes of the upload


def _frame(values: np.ndarray | None, buffers: np.ndarray, num_samples: int, loss: float, dtype: str,
           **meta: float) -> np.ndarray:
    parts = {"meta": codec.encode_scalars(num_samples=num_samples, loss=loss, **meta)}
    if values is not None:
        parts["values"] = values
    if buffers.size:
        parts["buffers"] = codec.encode_values(buffers, "float32")
    return codec.encode_message(parts)


class Strategy:
    """FedAvg: every scalar, every round (the baseline the others are measured against)."""

    name = "fedavg"
    config_section: str | None = None  # the StrategyConfig field holding this strategy's options

    def __init__(self, cfg: StrategyConfig) -> None:
        self.cfg = cfg
        self.dtype = cfg.value_dtype

    # ---- server half -------------------------------------------------------------------
    def setup(self, init_params: np.ndarray, seed: int) -> None:
        self.num_params = int(init_params.size)

    def plan(self, round_idx: int) -> RoundPlan:
        return RoundPlan(round=round_idx, mask=None, train_mask=None)

    def aggregate(
        self, params: np.ndarray, buffers: np.ndarray, uploads: list[DecodedUpload]
    ) -> tuple[np.ndarray, np.ndarray]:
        used = [u for u in uploads if u.update is not None]
        if not used:
            return params, buffers
        weights = [u.num_samples for u in used]
        new_params = params + weighted_mean([u.update for u in used], weights)
        new_buffers = weighted_mean([u.buffers for u in used], weights) if buffers.size else buffers
        return new_params, new_buffers

    def observe(self, params: np.ndarray) -> None:
        """Called with the new global vector after every aggregation."""

    @property
    def mask(self) -> np.ndarray | None:
        return None

    @property
    def threshold(self) -> float | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- client half -------------------------------------------------------------------
    def start_params(self, plan: RoundPlan, global_params: np.ndarray, client_state: dict) -> np.ndarray:
        """The vector a client starts local training from."""
        return global_params

    def encode_upload(
        self,
        plan: RoundPlan,
        global_params: np.ndarray,
        local_params: np.ndarray,
        buffers: np.ndarray,
        num_samples: int,
        loss: float,
        client_state: dict,
    ) -> np.ndarray:
        update = local_params - global_params
        values = update if plan.mask is None else update[plan.mask]
        return _frame(codec.encode_values(values, self.dtype), buffers, num_samples, loss, self.dtype)

    def decode_upload(self, plan: RoundPlan, client_id: int, buf: np.ndarray, num_params: int) -> DecodedUpload:
        parts = codec.decode_message(buf)
        meta = codec.decode_scalars(parts["meta"])
        update = None
        if "values" in parts:
            update = self._densify(plan, parts["values"], num_params)
        buffers = codec.decode_values(parts["buffers"]) if "buffers" in parts else np.zeros(0, np.float32)
        return DecodedUpload(client_id, update, buffers, int(meta["num_samples"]), float(meta["loss"]),
                             int(buf.nbytes))

    def _densify(self, plan: RoundPlan, values_buf: np.ndarray, num_params: int) -> np.ndarray:
        values = codec.decode_values(values_buf)
        if plan.mask is None:
            if values.size != num_params:
                raise ValueError(f"upload has {values.size} values, model has {num_params}")
            return values
        expected = int(plan.mask.sum())
        if values.size != expected:
            raise ValueError(f"upload has {values.size} values, mask has {expected} active scalars")
        dense = np.zeros(num_params, dtype=np.float32)
        dense[plan.mask] = values
        return dense


class APFStrategy(Strategy):
    """Adaptive Parameter Freezing: frozen scalars are neither trained nor sent (SPEC §2–§3)."""

    name = "apf"
    config_section = "apf"
    period_policy: str | None = None  # None = the configured one

    def setup(self, init_params: np.ndarray, seed: int) -> None:
        super().setup(init_params, seed)
        a = self.cfg.apf
        self.controller = APFController(
            init_params,
            alpha=a.alpha,
            threshold=a.threshold,
            tighten_ratio=a.tighten_ratio,
            threshold_min=a.threshold_min,
            check_every=a.check_every,
            aggressive_prob=a.aggressive_prob,
            period_policy=self.period_policy or a.period_policy,
            seed=seed,
        )
        self._mask = np.ones(init_params.size, dtype=bool)

    def plan(self, round_idx: int) -> RoundPlan:
        mask = None if self._mask.all() else self._mask.copy()
        return RoundPlan(round=round_idx, mask=mask, train_mask=mask)

    def observe(self, params: np.ndarray) -> None:
        self._mask = np.asarray(self.controller.update(params), dtype=bool).copy()

    @property
    def mask(self) -> np.ndarray:
        return self._mask

    @property
    def threshold(self) -> float:
        return float(self.controller.threshold)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "mask": self._mask.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self._mask = np.asarray(state["mask"], dtype=bool).copy()


class PermanentFreezing(APFStrategy):
    """Strawman (paper Fig. 6): once stable, frozen forever."""

    name = "permanent"
    period_policy = "permanent"


class PartialSync(APFStrategy):
    """Strawman (paper Fig. 5): stable scalars are not sent, but keep training locally.

    Each client keeps its own values at unsynchronised positions, so clients drift apart
    on non-IID data — the failure mode APF's freezing avoids.
    """

    name = "partial_sync"

    def plan(self, round_idx: int) -> RoundPlan:
        p = super().plan(round_idx)
        return RoundPlan(round=round_idx, mask=p.mask, train_mask=None)

    def start_params(self, plan: RoundPlan, global_params: np.ndarray, client_state: dict) -> np.ndarray:
        local = client_state.get("local")
        if plan.mask is None or local is None:
            return global_params
        return np.where(plan.mask, global_params, local)

    def encode_upload(self, plan, global_params, local_params, buffers, num_samples, loss, client_state):
        client_state["local"] = local_params.copy()
        return super().encode_upload(plan, global_params, local_params, buffers, num_samples, loss, client_state)


class _SparseUpload(Strategy):
    """Shared decode for strategies that upload (indices, values) sparse vectors."""

    def _densify(self, plan: RoundPlan, values_buf: np.ndarray, num_params: int) -> np.ndarray:
        idx, vals, n = codec.decode_sparse(values_buf)
        if n != num_params:
            raise ValueError(f"sparse upload is for {n} scalars, model has {num_params}")
        return codec.densify(idx, vals, n)


class TopKStrategy(_SparseUpload):
    """Top-k sparsification with error feedback (residual kept on the client)."""

    name = "topk"
    config_section = "topk"

    def encode_upload(self, plan, global_params, local_params, buffers, num_samples, loss, client_state):
        comp = codec.TopKCompressor(self.cfg.topk.ratio, self.dtype)
        buf, client_state["residual"] = comp.compress(local_params - global_params, client_state.get("residual"))
        return _frame(buf, buffers, num_samples, loss, self.dtype)


class GaiaStrategy(_SparseUpload):
    """Gaia: send a scalar only when its update is significant relative to its value."""

    name = "gaia"
    config_section = "gaia"

    def encode_upload(self, plan, global_params, local_params, buffers, num_samples, loss, client_state):
        g = self.cfg.gaia
        filt = codec.GaiaFilter(g.threshold, g.decay, g.min_threshold, self.dtype)
        buf, client_state["residual"] = filt.compress(
            local_params - global_params, global_params, client_state.get("residual"), plan.round - 1
        )
        return _frame(buf, buffers, num_samples, loss, self.dtype)


class CMFLStrategy(Strategy):
    """CMFL: a client whose update disagrees in sign with the last global update skips uploading.

    The sign of the previous global update travels to clients as a bitmap (n/8 bytes,
    counted in the downlink).
    """

    name = "cmfl"
    config_section = "cmfl"

    def setup(self, init_params: np.ndarray, seed: int) -> None:
        super().setup(init_params, seed)
        self._prev = init_params.copy()
        self._last_update: np.ndarray | None = None

    def plan(self, round_idx: int) -> RoundPlan:
        extras = {}
        if self._last_update is not None:
            extras["sign"] = codec.encode_mask(self._last_update > 0)
            extras["nonzero"] = codec.encode_mask(self._last_update != 0)
        return RoundPlan(round=round_idx, mask=None, train_mask=None, extras=extras)

    def observe(self, params: np.ndarray) -> None:
        self._last_update = params - self._prev
        self._prev = params.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"prev": self._prev.copy(), "last_update": None if self._last_update is None else self._last_update.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._prev = np.asarray(state["prev"], dtype=np.float32).copy()
        lu = state["last_update"]
        self._last_update = None if lu is None else np.asarray(lu, dtype=np.float32).copy()

    def encode_upload(self, plan, global_params, local_params, buffers, num_samples, loss, client_state):
        update = local_params - global_params
        if "sign" in plan.extras:
            positive = codec.decode_mask(plan.extras["sign"])
            nonzero = codec.decode_mask(plan.extras["nonzero"])
            considered = nonzero & (update != 0)
            agree = (update > 0) == positive
            relevance = float(agree[considered].mean()) if considered.any() else 1.0
            if relevance < self.cfg.cmfl.threshold:
                return _frame(None, np.zeros(0, np.float32), num_samples, loss, self.dtype,
                              skipped=1.0, relevance=relevance)
        return _frame(codec.encode_values(update, self.dtype), buffers, num_samples, loss, self.dtype)


STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (Strategy, APFStrategy, PermanentFreezing, PartialSync, TopKStrategy, GaiaStrategy, CMFLStrategy)
}


def make_strategy(cfg: StrategyConfig) -> Strategy:
    try:
        return STRATEGIES[cfg.name](cfg)
    except KeyError:
        raise ValueError(f"strategy.name: unknown strategy {cfg.name!r}; known: {', '.join(STRATEGIES)}") from None
