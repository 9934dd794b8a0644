"""Callbacks: everything that reacts to a run, with a lifecycle and, if they need it, state.

The round loop (:func:`apf_ray.run.run`) calls, in the driver's process and the same way for
every backend: ``load_state_dict`` (resuming, callbacks that keep state), ``on_start`` once,
``on_round`` after every round, ``on_exception`` if a round or a callback raised, and
``on_end`` once, always (in a ``finally``), with a summary that says how the run ended
(:func:`outcome`). Callbacks see the run through a :class:`RunView`, never the backend.

A callback that defines ``state_dict()`` (and ``load_state_dict(state)``) keeps that state in
the run's checkpoint, under its ``state_key``, and gets it back when the run resumes: the
checkpoint is written by the round engine (inside the Ray server actor on Ray), so the loop
hands the callbacks' state over with each save request. Each round, callbacks with state see
it first, then the :class:`Checkpointer` (when a checkpoint is due, so their state in it is as
of that round), then the rest (metrics writer, progress, Tune reporter), which find
``event.checkpoint`` set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from apf_ray.config import ExperimentConfig
from apf_ray.records import RoundEvent

if TYPE_CHECKING:
    from apf_ray.backends import Backend
    from apf_ray.flat import FlatLayout
    from apf_ray.server import ServerCore

T = TypeVar("T")


def _params(server: ServerCore) -> np.ndarray:
    return server.params.copy()


def _mask(server: ServerCore) -> np.ndarray:
    return server.active_mask()


@dataclass(frozen=True)
class RunView:
    """A read-only view of a run, what callbacks get in ``on_start``.

    ``start_round``: rounds already done (a resumed run starts after its checkpoint);
    ``info``: the backend's start-up report (pools, actors, ``num_params``); ``layout``: where
    each layer lives in the flat parameter vector. The live model is read on request, where the
    engine runs (this process, or the Ray server actor): :meth:`global_params`,
    :meth:`active_mask`, or any read of the server with :meth:`query`.
    """

    cfg: ExperimentConfig
    run_dir: Path
    start_round: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    layout: FlatLayout | None = None
    source: Backend | None = field(default=None, repr=False)  # where queries go

    def query(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(server, *args)`` on the run's :class:`~apf_ray.server.ServerCore`, where it runs.

        ``fn`` must only read, and return copies (in-process it sees the live objects); on
        Ray, ``fn`` and ``args`` travel pickled, so pass a module-level function and plain data.
        """
        if self.source is None:
            raise RuntimeError("this view has no running engine to read")
        return self.source.query(fn, *args)

    def global_params(self) -> np.ndarray:
        """The current global model as one float32 vector (a copy)."""
        return self.query(_params)

    def active_mask(self) -> np.ndarray:
        """Which scalars the next round synchronises (True = active; a copy)."""
        return self.query(_mask)


RunContext = RunView
"""The name of :class:`RunView` before callbacks lost the backend; callbacks written against it still work."""


class Callback:
    """Base class; override the hooks you need. Define ``state_dict``/``load_state_dict`` to keep state.

    ``state_key`` names the state in the checkpoint (default: the class's qualified name); two
    callbacks with state in one run need different keys. ``needs_written_checkpoints``: this
    callback reads ``event.checkpoint``'s folder in ``on_round`` (e.g. to hand it to Ray Tune),
    so the run writes each checkpoint before the round's callbacks go on instead of in the
    background.
    """

    state_key: str | None = None
    needs_written_checkpoints: bool = False

    def on_start(self, view: RunView) -> None:
        """The backend is up; ``view.start_round`` rounds are already done (state already loaded)."""

    def on_round(self, event: RoundEvent) -> None:
        """A round finished (``event.checkpoint`` is set if it was checkpointed, for callbacks without state)."""

    def on_exception(self, err: BaseException) -> None:
        """A round or a callback raised ``err``; ``on_end`` follows, then ``err`` propagates."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """The run ended, however it ended (:func:`outcome`); ``summary`` is what summary.json holds
        (a run that failed or was abandoned writes none)."""


ENDINGS = ("failed", "abandoned", "stopped")
"""Keys a summary handed to ``on_end`` holds when the run did not finish all its rounds."""


def outcome(summary: dict[str, Any]) -> str:
    """How a run ended: ``finished``, ``stopped`` (a signal; the round in flight was checkpointed and
    ``summary["stopped"]`` says after which round), ``abandoned`` (a second signal: nothing waited
    for) or ``failed`` (``summary["failed"]["error"]`` says why)."""
    return next((key for key in ENDINGS if key in summary), "finished")


def has_state(cb: Callback) -> bool:
    return callable(getattr(cb, "state_dict", None))


def stateful_callbacks(callbacks: Iterable[Callback]) -> dict[str, Callback]:
    """The callbacks that keep state, by ``state_key``; ValueError if two share a key."""
    keyed: dict[str, Callback] = {}
    for cb in callbacks:
        if has_state(cb):
            key = cb.state_key or type(cb).__qualname__
            if key in keyed:
                raise ValueError(f"two callbacks keep state under the key {key!r}: give one another state_key")
            keyed[key] = cb
    return keyed


class Checkpointer(Callback):
    """Checkpoints every ``output.checkpoint_every`` rounds and at the end, through ``save``.

    ``save(background)`` asks the backend's engine to write the checkpoint, with the callbacks'
    state, and returns its directory (:func:`apf_ray.run.run` supplies it). With ``background``
    the write goes on while the next round runs, so a round pays only for copying the state
    (``phase_s["checkpoint"]``); the loop waits for it before the run ends. A callback that
    hands each checkpoint on at once (Tune's reporter) sets ``needs_written_checkpoints``, and
    the run's checkpoints are then written before ``on_round`` goes on.
    """

    def __init__(self, save: Callable[[bool], Path], background: bool = False) -> None:
        self.save, self.background = save, background

    def on_start(self, view: RunView) -> None:
        self.every = view.cfg.output.checkpoint_every
        self.rounds = view.cfg.train.rounds

    def on_round(self, event: RoundEvent) -> None:
        """Checkpoint when due, timing it into the round's ``phase_s["checkpoint"]`` (seconds)."""
        r = event.record.round
        if (self.every and r % self.every == 0) or r >= self.rounds:
            start = time.perf_counter()
            event.checkpoint = self.save(self.background)
            event.record.phase_s["checkpoint"] = time.perf_counter() - start
