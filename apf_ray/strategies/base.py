"""The strategy interface: what the server sends, what a client uploads, how uploads combine.

A strategy is one class with its own pydantic ``Options``, registered by name with
:func:`register_strategy` (or named by import path in ``strategy.name``). It has two halves,
built from the same config on both sides. Its hooks, in the order a round calls them
(Flower's strategy ABC is the model; here the byte-level upload is part of the contract
because counting real bytes is the point):

server  ``setup`` (once) → ``select_clients`` → ``plan`` → ``client_plan`` per client →
        [clients] → ``decode_upload`` per client (beside the clients when the round is
        summed on the way in: :meth:`Strategy.streams`, :mod:`apf_ray.edge`) → (validation,
        robust consensus) → ``apply_partial`` of the summed uploads, or ``aggregate`` of
        every upload → ``observe_uploads`` (every upload kept) / ``observe_tallies`` (the
        uploads' summed ``tally_upload`` counts) → ``observe`` (the new global vector; APF
        runs its controller here). ``state_dict`` / ``load_state_dict`` checkpoint it.
client  ``setup_client`` (once per host) → ``new_client_state`` (a client's first round) →
        ``start_params`` → local training with ``plan.train_mask`` and ``gradient_term`` →
        ``encode_upload``

The client half runs in client actors and must be a pure function of the options, the plan
and the client's own state, so actors rebuild the strategy from the config without the
server's memory. A client's state is a ``dict`` of numpy arrays and JSON scalars (str keys)
that the client-half hooks may change in place (its arrays may arrive read-only, through
Ray's object store or a checkpoint: replace them, or write into a copy); the engine keeps it
between the client's rounds and checkpoints it with the run, so a resumed run equals an
uninterrupted one.
Uploads are model deltas (local − global); the synchronised scalars go through the
configured uplink chain (:mod:`apf_ray.uplink`).

What applies to every strategy stays outside it, so no strategy can skip it: faults are
injected into the encoded upload (:mod:`apf_ray.faults`), the server validates every decoded
upload (:mod:`apf_ray.validation`), and a robust ``defence.aggregation`` reduces the valid
uploads to one consensus upload before ``aggregate`` sees them (:mod:`apf_ray.consensus`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from apf_ray import wire
from apf_ray.aggregation import Partial
from apf_ray.masks import mask_index
from apf_ray.plugins import resolve, subclass_of
from apf_ray.records import RoundPlan
from apf_ray.uplink import UplinkChain

if TYPE_CHECKING:
    import torch

GradientTerm = Callable[["torch.Tensor", "torch.Tensor"], None]
"""A client-side addition to the training objective: ``term(params, grads)`` adds the gradient
of the extra loss term at ``params`` to ``grads`` in place (both flat, on the training device),
after each backward pass and before the (masked) SGD step, so frozen scalars still stay fixed."""

UPLOAD_PARTS = frozenset({"meta", "values", "buffers"})
"""The parts every upload message may hold; a strategy names any more in ``upload_parts``."""


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
    meta: dict[str, float] = field(default_factory=dict)  # metadata beyond num_samples and loss
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # the strategy's own upload parts, raw

    @cached_property
    def update(self) -> np.ndarray | None:
        """Dense float32 delta, +0.0 at the scalars not synchronised; None if the client skipped."""
        if self.values is None or self.sync_mask is None:
            return self.values
        dense = np.zeros(self.sync_mask.size, dtype=np.float32)
        dense[mask_index(self.sync_mask)] = self.values
        return dense


def frame_upload(values: np.ndarray | None, buffers: np.ndarray, num_samples: int, loss: float,
                 extra_parts: dict[str, np.ndarray] | None = None, **meta: float) -> np.ndarray:
    """One upload message: metadata, the values part (None: skipped), the buffers, and any
    parts of the strategy's own (each an encoded uint8 buffer named in ``upload_parts``)."""
    parts = {"meta": wire.encode_scalars(num_samples=num_samples, loss=loss, **meta)}
    if values is not None:
        parts["values"] = values
    if buffers.size:
        parts["buffers"] = wire.encode_values(buffers, "float32")
    parts.update(extra_parts or {})
    return wire.encode_message(parts)


def same_sync_mask(uploads: list[DecodedUpload]) -> bool:
    """Whether every upload synchronised the same scalars (equal masks, or all None).

    The rule for combining compact ``values`` position by position: they line up only when
    the masks are equal. Per-client plans (:meth:`Strategy.client_plan`) may differ.
    """
    first = uploads[0].sync_mask
    if first is None:
        return all(u.sync_mask is None for u in uploads)
    return all(u.sync_mask is not None and np.array_equal(u.sync_mask, first) for u in uploads)


def union_mask(uploads: list[DecodedUpload]) -> np.ndarray | None:
    """The scalars any of ``uploads`` synchronised (None: all of them)."""
    if any(u.sync_mask is None for u in uploads):
        return None
    return np.logical_or.reduce([u.sync_mask for u in uploads])


class Strategy(ABC):
    """Base of every strategy; subclasses set ``name`` and may set ``Options``."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    upload_parts: ClassVar[frozenset[str]] = frozenset()
    """Names of the strategy's own upload parts (besides ``UPLOAD_PARTS``); decoded raw into
    ``DecodedUpload.parts``, counted in the upload's bytes like every other part."""

    def __init__(self, options: BaseModel, uplink: UplinkChain, seed: int = 0) -> None:
        self.options = options
        self.uplink = uplink
        self.seed = seed
        self.num_params = 0

    # ---- server half -------------------------------------------------------------------
    def setup(self, init_params: np.ndarray) -> None:
        """Called once on the server with the initial global vector."""
        self.num_params = int(init_params.size)

    def select_clients(self, rng: np.random.Generator, num_clients: int, k: int) -> list[int]:
        """The sorted ids of the clients a round trains: by default ``k`` of
        ``num_clients`` uniformly without replacement, drawn from ``rng`` (the server's sampling
        generator, checkpointed with it, so a resumed run draws the same clients)."""
        from apf_ray.workload import sample_clients  # torch-heavy; strategies load with the config

        return sample_clients(rng, num_clients, k)

    @abstractmethod
    def plan(self, round_idx: int) -> RoundPlan:
        """What round ``round_idx`` (1-based) synchronises and trains, and any side data."""

    def client_plan(self, plan: RoundPlan, client_id: int) -> RoundPlan | None:
        """A plan of client ``client_id``'s own this round, or None (the default): the round's ``plan``.

        Return a ``RoundPlan`` to give one client its own masks or extras; its upload is
        decoded against it. The downlink counts each plan's extras for the client that gets
        it; masks that differ from the strategy's ``sync_mask`` should travel in the extras.
        """
        return plan

    def decode_upload(self, plan: RoundPlan, client_id: int, buf: np.ndarray) -> DecodedUpload:
        """Read one upload; any malformed content is a ValueError naming what is wrong."""
        parts = wire.decode_message(buf)
        unexpected = set(parts) - UPLOAD_PARTS - self.upload_parts
        if "meta" not in parts or unexpected:
            optional = sorted(UPLOAD_PARTS - {"meta"} | self.upload_parts)
            raise ValueError(f"upload must hold 'meta' and optionally {optional}, got {sorted(parts)}")
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
        extra_meta = {k: v for k, v in meta.items() if k not in ("num_samples", "loss")}
        return DecodedUpload(client_id, values, buffers, int(num_samples), float(meta["loss"]), int(buf.nbytes),
                             plan.sync_mask, extra_meta, {k: parts[k] for k in self.upload_parts if k in parts})

    @classmethod
    def streams(cls) -> bool:
        """Whether the round's uploads may be summed on the way in (:mod:`apf_ray.edge`).

        True when the strategy keeps the default :meth:`aggregate` (whatever it does in
        :meth:`apply_partial`) and reads no upload one by one in :meth:`observe_uploads`: its
        aggregate is then a function of the uploads' sample-weighted sums, which each client
        actor computes for its own clients, and what it learns from each upload is a count
        (:meth:`tally_upload`, summed likewise; GWPF's thaw votes). A strategy overriding
        either gets every decoded upload on the server, as before, and the run is refused up
        front when a round's uploads cannot fit there (:func:`apf_ray.edge.check_round_memory`).
        """
        return cls.aggregate is Strategy.aggregate and cls.observe_uploads is Strategy.observe_uploads

    def aggregate(self, params: np.ndarray, buffers: np.ndarray,
                  uploads: list[DecodedUpload]) -> tuple[np.ndarray, np.ndarray]:
        """New (params, buffers) from the round's valid uploads: :meth:`apply_partial` of their sums.

        The uploads are summed in order into one :class:`~apf_ray.aggregation.Partial` (their
        compact values, over the union of their masks when per-client plans differ), so this
        equals the streamed path with one group bit for bit. Under a robust
        ``defence.aggregation`` the uploads are already one consensus upload
        (:mod:`apf_ray.consensus`), whose mean is itself.
        """
        partial = Partial()
        for u in uploads:
            if u.values is not None:
                partial.add(u.values, u.sync_mask, u.buffers, u.num_samples)
        return self.apply_partial(params, buffers, partial)

    def apply_partial(self, params: np.ndarray, buffers: np.ndarray,
                      partial: Partial) -> tuple[np.ndarray, np.ndarray]:
        """New (params, buffers): the sample-weighted mean delta of ``partial`` added to the global vector.

        ``partial`` holds the sums of every valid upload of the round (all skipped: empty, and
        the model is kept). The mean is added at the synchronised positions only; a
        scalar that no upload synchronised is not touched, so it stays bit-identical (a frozen
        −0.0 included). Override this (not :meth:`aggregate`) to change how the mean is applied
        (a server learning rate) and keep aggregation on the way in.
        """
        if partial.empty:
            return params, buffers
        combined, mean_buffers = partial.mean()
        new_buffers = mean_buffers if buffers.size else buffers
        if partial.sync_mask is None:
            return params + combined, new_buffers
        new_params = params.copy()
        new_params[mask_index(partial.sync_mask)] += combined
        return new_params, new_buffers

    def observe_uploads(self, uploads: list[DecodedUpload]) -> None:  # noqa: B027 - an optional hook
        """Called with the round's valid uploads, one per client (skips included), after the
        round was aggregated and before :meth:`observe`: what a strategy learns from each client
        beyond the model. Under a robust defence ``aggregate`` sees one consensus upload, so
        per-client side data is read here (or counted by :meth:`tally_upload`), never combined
        values. Overriding it keeps every upload on the server (:meth:`streams`); a count per
        upload streams instead through :meth:`tally_upload`."""

    def tally_upload(self, upload: DecodedUpload) -> dict[str, np.ndarray]:
        """Integer counts (by name) that one valid upload adds to its round, skips included:
        summed beside the clients with the values (exact, so in any grouping the same) and
        handed to :meth:`observe_tallies`. The streaming form of :meth:`observe_uploads`."""
        return {}

    def observe_tallies(self, tallies: dict[str, np.ndarray]) -> None:  # noqa: B027 - an optional hook
        """Called with the round's summed :meth:`tally_upload` counts (int64 arrays), after the
        round was aggregated and before :meth:`observe` (GWPF thaws on its votes here)."""

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
        """Server-side state to checkpoint (numpy arrays and JSON scalars, str keys).

        Arrays may be the strategy's live ones (no need to copy): a background checkpoint copies
        them while the next round's clients train, so change them only from the round's
        aggregation on (``plan`` and ``select_clients`` run beside that copy)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - an optional hook
        """Restore :meth:`state_dict`."""

    # ---- client half -------------------------------------------------------------------
    def setup_client(self, num_params: int) -> None:
        """Called once in every client host (in-process or a Ray actor) with the model's size."""
        self.num_params = int(num_params)

    def new_client_state(self, client_id: int) -> dict[str, Any]:
        """A client's state before its first round (numpy arrays and JSON scalars, str keys)."""
        return {}

    def start_params(self, plan: RoundPlan, global_params: np.ndarray, client_state: dict) -> np.ndarray:
        """The vector a client starts local training from."""
        return global_params

    def gradient_term(self, plan: RoundPlan, global_params: np.ndarray, client_state: dict) -> GradientTerm | None:
        """An extra term of the client's local objective (FedProx's proximal term), or None."""
        return None

    def encode_upload(self, plan: RoundPlan, global_params: np.ndarray, local_params: np.ndarray,
                      buffers: np.ndarray, num_samples: int, loss: float, client_state: dict) -> np.ndarray:
        """The client's upload: its delta over the synchronised scalars, through the uplink chain."""
        return frame_upload(self.upload_values(plan, global_params, local_params, client_state), buffers,
                            num_samples, loss)

    def upload_values(self, plan: RoundPlan, global_params: np.ndarray, local_params: np.ndarray,
                      client_state: dict) -> np.ndarray:
        """The encoded values part: the delta over ``plan.sync_mask`` through the uplink chain
        (whose error-feedback residual, if any, lives in ``client_state``)."""
        return self.uplink.encode(local_params - global_params, plan.sync_mask, global_params, plan.round - 1,
                                  client_state)


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
