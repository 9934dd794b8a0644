"""What a round produces and what travels between the server and the clients.

Plain dataclasses, so the same objects cross a Ray call, land in Parquet tables and reach
callbacks. Units: bytes are wire bytes counted from encoded buffers; times are seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

ClientStatus = Literal["ok", "skipped", "error", "timeout", "died", "no_actor"]
"""How a sampled client's round ended.

``ok``: its upload was aggregated. ``skipped``: it reported but chose not to upload (CMFL).
``error``: training raised or its upload could not be decoded. ``timeout``: not back by
``cluster.round_timeout_s``. ``died``: its actor died. ``no_actor``: its pool had no actor.
"""

REPORTED: frozenset[str] = frozenset({"ok", "skipped"})
"""Statuses of clients that reported this round (they count towards the quorum)."""


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


@dataclass
class ClientResult:
    """What a client host returns for one client: the wire buffer or why there is none."""

    client_id: int
    upload: np.ndarray | None  # the wire buffer (uint8); None when the client failed
    compute_s: float = 0.0
    error: str | None = None
    device: str = "cpu"
    state: dict | None = None  # the client's strategy state after this round (residuals), if any


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
    clients_reported: int
    clients_dropped: int
    wall_s: float
    simulated_s: float
    cum_simulated_s: float
    layer_frozen: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundEvent:
    """What every callback receives after a round, in-process and on Ray alike."""

    record: RoundRecord
    clients: list[ClientRecord]
    pool_events: list[str] = field(default_factory=list)  # actors added or dropped (Ray)
    checkpoint: Path | None = None  # set by the checkpointer when this round was checkpointed
