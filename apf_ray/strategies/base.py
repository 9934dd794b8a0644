"""The strategy interface: what the server sends, what a client uploads, how uploads combine.

A strategy is one class with its own pydantic ``Options``, registered by name with
:func:`register_strategy` (or named by import path in ``strategy.name``). Its hooks, in the
order a round calls them (Flower's strategy ABC is the model; here the byte-level upload is
part of the contract because counting real bytes is the point):

server  ``setup`` (once) → ``plan`` → [clients] → ``decode_upload`` per client →
        ``aggregate`` → ``observe`` (the new global vector; APF runs its controller here)
client  ``start_params`` → local training with ``plan.train_mask`` → ``encode_upload``

The client half runs in client actors and must be a pure function of the options, the plan
and the client's own small state (residuals), so actors rebuild the strategy from the
config without the server's memory. Uploads are model deltas (local − global); the
synchronised scalars go through the configured uplink chain (:mod:`apf_ray.uplink`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from apf_ray import wire
from apf_ray.aggregation import Aggregator
from apf_ray.plugins import resolve, subclass_of
from apf_ray.records import RoundPlan
from apf_ray.uplink import UplinkChain


class NoOptions(BaseModel):
    """Options model of a strategy that takes none."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class DecodedUpload:
    """A client's upload as the server reads it.

    ``values`` is the update over the round's synchronised scalars — those of ``sync_mask``
    (bool, one per scalar), or all of them when it is None — in flat order, 0 where nothing was
    sent; None if the client skipped. It stays compact so that the server's work per upload is
    a few passes over what was synchronised, not a scatter into a model-sized vector per client;
    :attr:`update` is the dense delta, for strategies that want one.
    """

    client_id: int
    values: np.ndarray | None
    buffers: np.ndarray  # non-trainable state (BatchNorm statistics), dense
    num_samples: int
    loss: float
    nbytes: int  # wire bytes of the upload
    sync_mask: np.ndarray | None = None

    @cached_property
    def update(self) -> np.ndarray | None:
        """Dense float32 delta, +0.0 at the scalars not synchronised; None if the client skipped."""
        if self.values is None or self.sync_mask is None:
            return self.values
        dense = np.zeros(self.sync_mask.size, dtype=np.float32)
        dense[self.sync_mask] = self.values
        return dense


def frame_upload(values: np.ndarray | None, buffers: np.ndarray, num_samples: int, loss: float,
                 **meta: float) -> np.ndarray:
    """One upload message: metadata, the values part (None: skipped) and the buffers."""
    parts = {"meta": wire.encode_scalars(num_samples=num_samples, loss=loss, **meta)}
    if values is not None:
        parts["values"] = values
    if buffers.size:
        parts["buffers"] = wire.encode_values(buffers, "float32")
    return wire.encode_message(parts)


class Strategy(ABC):
    """Base of every strategy; subclasses set ``name`` and may set ``Options``."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel, uplink: UplinkChain, seed: int = 0) -> None:
        self.options = options
        self.uplink = uplink
        self.seed = seed
        self.num_params = 0
        # How vectors are combined (``defence.aggregation``); the server sets it after construction.
        self.aggregator = Aggregator()

    # ---- server half -------------------------------------------------------------------
    def setup(self, init_params: np.ndarray) -> None:
        """Called once on the server with the initial global vector."""
        self.num_params = int(init_params.size)

    @abstractmethod
    def plan(self, round_idx: int) -> RoundPlan:
        """What round ``round_idx`` (1-based) synchronises and trains, and any side data."""

    def decode_upload(self, plan: RoundPlan, client_id: int, buf: np.ndarray) -> DecodedUpload:
        """Read one upload; any malformed content is a ValueError naming what is wrong."""
        parts = wire.decode_message(buf)
        unexpected = set(parts) - {"meta", "values", "buffers"}
        if "meta" not in parts or unexpected:
            raise ValueError(f"upload must hold 'meta' and optionally 'values' and 'buffers', got {sorted(parts)}")
        meta = wire.decode_scalars(parts["meta"])
        for key in ("num_samples", "loss"):
            if key not in meta:
                raise ValueError(f"upload metadata lacks {key!r}")
        num_samples = meta["num_samples"]
        if not (math.isfinite(num_samples) and num_samples.is_integer()):
            raise ValueError(f"upload claims {num_samples!r} samples, not a whole number")
        values = None
        if "values" in parts:
            num_synced = self.num_params if plan.sync_mask is None else int(np.count_nonzero(plan.sync_mask))
            values = self.uplink.decode(parts["values"], num_synced)
        buffers = np.zeros(0, np.float32)
        if "buffers" in parts:
            if wire.value_dtype(parts["buffers"]) != "float32":
                raise ValueError(f"upload buffers are {wire.value_dtype(parts['buffers'])}, expected float32")
            buffers = wire.decode_values(parts["buffers"])
        return DecodedUpload(client_id, values, buffers, int(num_samples), float(meta["loss"]), int(buf.nbytes),
                             plan.sync_mask)

    def aggregate(self, params: np.ndarray, buffers: np.ndarray,
                  uploads: list[DecodedUpload]) -> tuple[np.ndarray, np.ndarray]:
        """New (params, buffers): the combined delta added to the global vector.

        Combined by ``self.aggregator``: the sample-weighted mean unless ``defence.aggregation``
        asks for a coordinate-wise robust statistic — computed over the uploads' compact values
        (the synchronised scalars only) and added at those positions in one pass. A scalar that
        is not synchronised is not touched, so it stays bit-identical (a frozen −0.0 included).
        """
        used = [u for u in uploads if u.values is not None]
        if not used:
            return params, buffers
        weights = [u.num_samples for u in used]
        mask = used[0].sync_mask
        new_buffers = self.aggregator([u.buffers for u in used], weights) if buffers.size else buffers
        if any(u.sync_mask is not mask for u in used):  # uploads decoded against different plans
            return params + self.aggregator([u.update for u in used], weights, self.sync_mask), new_buffers
        combined = self.aggregator([u.values for u in used], weights)
        if mask is None:
            return params + combined, new_buffers
        new_params = params.copy()
        new_params[mask] += combined
        return new_params, new_buffers

    def observe(self, params: np.ndarray) -> None:  # noqa: B027 - an optional hook
        """Called with the new global vector after every aggregated round.

        A round that was not aggregated (quorum missed, or discarded) is not observed: the
        model did not move, and APF would otherwise count it as a check of zero motion.
        """

    @property
    def sync_mask(self) -> np.ndarray | None:
        """Scalars synchronised in the next round (None: all)."""
        return None

    @property
    def threshold(self) -> float | None:
        """A stability threshold to report, if the strategy has one."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint (numpy arrays and JSON scalars, str keys)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - an optional hook
        """Restore :meth:`state_dict`."""

    # ---- client half -------------------------------------------------------------------
    def start_params(self, plan: RoundPlan, global_params: np.ndarray, client_state: dict) -> np.ndarray:
        """The vector a client starts local training from."""
        return global_params

    def encode_upload(self, plan: RoundPlan, global_params: np.ndarray, local_params: np.ndarray,
                      buffers: np.ndarray, num_samples: int, loss: float, client_state: dict) -> np.ndarray:
        """The client's upload: its delta over the synchronised scalars, through the uplink chain."""
        values = self.uplink.encode(local_params - global_params, plan.sync_mask, global_params,
                                    plan.round - 1, client_state)
        return frame_upload(values, buffers, num_samples, loss)


STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``strategy.name: <cls.name>``."""
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[Strategy]:
    """The registered strategy ``name``, or a user's Strategy subclass by import path."""
    return resolve(name, STRATEGIES, "strategy", check=subclass_of(Strategy), expected="a Strategy subclass")
