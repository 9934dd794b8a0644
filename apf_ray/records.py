"""What a round produces and what travels between the server and the clients.

Plain dataclasses, so the same objects cross a Ray call, land in Parquet tables and reach
callbacks. Units: bytes are wire bytes counted from encoded buffers; times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from apf_ray.client_store import StoredState, StoreLocation

ClientStatus = Literal["ok", "skipped", "discarded", "rejected", "error", "timeout", "died", "no_actor"]
"""How a sampled client's round ended (``ClientRecord.error`` says why for all but ``ok``).

Reported: ``ok``: its upload was aggregated. ``skipped``: it reported but chose not to upload
(CMFL). ``discarded``: its valid upload arrived, but the round was not aggregated (it missed
its quorum, or the aggregate was not finite), so the model was kept.
Refused: ``rejected``: its upload arrived but failed the server's checks (malformed, not
finite, over the norm bound, an impossible sample count: :mod:`apf_ray.validation`).
Failed (``clients_dropped``): ``error``: its training raised. ``timeout``: not back by
``cluster.round_timeout_s``. ``died``: its actor died. ``no_actor``: its pool had no actor.
"""

REPORTED: frozenset[str] = frozenset({"ok", "skipped", "discarded"})
"""Statuses of clients whose valid upload arrived this round (their time counts)."""

FAILED: frozenset[str] = frozenset({"error", "timeout", "died", "no_actor"})
"""Statuses counted as dropped: the client never delivered an upload."""


PHASES: tuple[str, ...] = ("sampling", "downlink", "clients", "decode", "aggregation", "controller", "evaluation",
                           "record", "checkpoint", "metrics")
"""Where a round's time goes, in order, as ``RoundRecord.phase_s`` names it (seconds each).

Server (:class:`~apf_ray.server.ServerCore`): ``sampling`` (clients and the strategy's plan),
``downlink`` (download accounting: bytes per client, versions, changed scalars), ``clients``
(from dispatch until every result is in or the deadline passed: training, transfers, Ray),
``decode`` (uploads decoded and validated), ``aggregation``, ``controller`` (the strategy's
observer: APF's stability check), ``evaluation`` (the global model on the test set),
``record`` (the round's metrics assembled). Callbacks, in the caller's process: ``checkpoint``
(the backend writing a checkpoint, as the checkpointer waits for it; absent in rounds without
one) and ``metrics`` (TensorBoard and the clients' journal; the round's own journal line, one
append, is written after it is measured).
"""


@dataclass
class RoundPlan:
    """What every client of one round receives besides the model (decided by the strategy)."""

    round: int
    sync_mask: np.ndarray | None  # scalars uploaded and aggregated this round (None = all)
    train_mask: np.ndarray | None  # scalars clients may train (None = all)
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # encoded strategy side data (downlink)


@dataclass
class Broadcast:
    """Everything a round's clients need; put into the object store once per round."""

    round: int  # 1-based round being run; the model is version round-1
    params: np.ndarray
    buffers: np.ndarray
    plan: RoundPlan
    client_plans: dict[int, RoundPlan] = field(default_factory=dict)  # clients with a plan of their own
    client_store: StoreLocation | None = None  # where clients' strategy state is (set by the round engine)
    edge_bounds: tuple[float, float] | None = None
    """Set when the round aggregates on the way in (:mod:`apf_ray.edge`): the validation bounds
    (update norm, buffer change; ``UploadValidator.norm_bound``/``buffer_bound``), computed once
    by the server so that every edge checks uploads exactly as the server would."""

    def plan_for(self, client_id: int) -> RoundPlan:
        """The plan client ``client_id`` trains and uploads by (``Strategy.client_plan``)."""
        return self.client_plans.get(client_id, self.plan)


@dataclass
class ClientResult:
    """What a client host returns for one client: the wire buffer or why there is none."""

    client_id: int
    upload: np.ndarray | None  # the wire buffer (uint8); None when the client failed
    compute_s: float = 0.0
    error: str | None = None
    device: str = "cpu"
    # the client's strategy state after this round, if any: its record once written to the run's
    # store (apf_ray/client_store.py), or the state itself from a host that cannot see the store
    state: StoredState | dict | None = None
    verdict: UploadVerdict | None = None  # decoded and checked at the edge (then ``upload`` is None)


@dataclass
class UploadVerdict:
    """What the server records of a client's upload, decided where it was decoded and checked
    (beside the clients under aggregation on the way in, else on the server): the fields of its
    ``ClientRecord``. ``status`` is ``ok``, ``skipped``, ``rejected`` or ``error`` (no upload)."""

    status: ClientStatus
    error: str = ""
    bytes_up: int = 0
    num_samples: int = 0
    train_loss: float | None = None


@dataclass
class ClientRecord:
    """One row of ``clients.parquet``: a sampled client's round."""

    round: int
    client_id: int
    pool: str
    status: ClientStatus
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0
    simulated_s: float = 0.0
    num_samples: int = 0
    train_loss: float | None = None
    device: str = ""  # where it trained (cpu / cuda)
    error: str = ""


@dataclass
class RoundRecord:
    """One row of ``rounds.parquet``. Accuracy and loss are None in rounds without evaluation."""

    round: int
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float | None
    bytes_up: int
    bytes_down: int
    cum_bytes_up: int
    cum_bytes_down: int
    frozen_fraction: float
    threshold: float | None  # APF's stability threshold T (None for strategies without one)
    clients_sampled: int
    clients_reported: int  # valid uploads that arrived (ok, skipped, discarded)
    clients_dropped: int  # failed: error, timeout, died, no_actor
    wall_s: float
    simulated_s: float
    cum_simulated_s: float
    layer_frozen: dict[str, float] = field(default_factory=dict)
    quorum_met: bool = True  # at least cfg.quorum() valid uploads arrived
    aggregated: bool = True  # the model moved: quorum met and the aggregate was finite
    clients_rejected: int = 0  # uploads refused by the server's checks
    clients_discarded: int = 0  # valid uploads of a round that was not aggregated
    phase_s: dict[str, float] = field(default_factory=dict)  # seconds per phase of PHASES (its keys only)


@dataclass
class RoundEvent:
    """What every callback receives after a round, in-process and on Ray alike."""

    record: RoundRecord
    clients: list[ClientRecord]
    pool_events: list[str] = field(default_factory=list)  # actors added or dropped (Ray)
    checkpoint: Path | None = None  # set by the checkpointer when this round was checkpointed
