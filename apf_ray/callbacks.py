"""Callbacks: everything that reacts to a run's rounds, with one signature each.

The round loop (:func:`apf_ray.run.run`) calls, in order, ``on_start`` once, ``on_round``
after every round and ``on_end`` once; the in-process and the Ray backends call them the
same way, in the driver's process. Checkpointing, metrics writing, the progress display and
Ray Tune reporting are all callbacks; the checkpointer runs first and sets
``event.checkpoint`` when it wrote one, so later callbacks (Tune) can attach it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apf_ray.config import ExperimentConfig
from apf_ray.records import RoundEvent

if TYPE_CHECKING:
    from apf_ray.backends import Backend


@dataclass
class RunContext:
    """What callbacks learn when a run starts."""

    cfg: ExperimentConfig
    run_dir: Path
    backend: Backend
    start_round: int = 0  # rounds already done (a resumed run starts after its checkpoint)
    info: dict[str, Any] = field(default_factory=dict)  # the backend's start-up report (pools, actors)


class Callback:
    """Base class; override the hooks you need."""

    def on_start(self, ctx: RunContext) -> None:
        """The backend is up; ``ctx.start_round`` rounds are already done."""

    def on_round(self, event: RoundEvent) -> None:
        """A round finished (``event.checkpoint`` is set if it was checkpointed)."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """The run finished (or stopped cleanly); ``summary`` is what summary.json holds."""


class Checkpointer(Callback):
    """Asks the backend to checkpoint every ``output.checkpoint_every`` rounds and at the end."""

    def on_start(self, ctx: RunContext) -> None:
        self.backend = ctx.backend
        self.every = ctx.cfg.output.checkpoint_every
        self.rounds = ctx.cfg.train.rounds

    def on_round(self, event: RoundEvent) -> None:
        """Checkpoint when due, timing it into the round's ``phase_s["checkpoint"]`` (seconds)."""
        r = event.record.round
        if (self.every and r % self.every == 0) or r >= self.rounds:
            start = time.perf_counter()
            event.checkpoint = self.backend.save_checkpoint()
            event.record.phase_s["checkpoint"] = time.perf_counter() - start
