"""Clean stops: what SIGINT (Ctrl-C) and SIGTERM (kill, systemd, Kubernetes) do to a run.

While a run sets up, a signal stops it at once (nothing has been done yet). Once rounds run,
the first signal only asks for a stop: the round in flight finishes (a Ray round is bounded
by its deadline), its callbacks run, a checkpoint of that round is written and the backend
closes; the run loop then raises :class:`~apf_ray.errors.RunStopped`. A second signal
abandons at once — :class:`Abandon` is a ``KeyboardInterrupt``, the one exception a signal
handler may raise through a blocking ``ray.get`` cleanly (Ray raises it as a plain
``KeyboardInterrupt``: :meth:`StopSignals.signal_of`) — and the last checkpoint stays.

Handlers are installed only in the main thread (Python allows no other) and the previous
ones are restored afterwards. ``ray.init`` replaces the SIGTERM handler with its own
``sys.exit``; :mod:`actors.backend` puts the one found here back.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Abandon(KeyboardInterrupt):
    """Raised by the handler to stop at once (during set-up, or on a second signal)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """Context manager holding the run's SIGINT/SIGTERM handlers; ``signum`` is the first signal seen.

    ``on_signal`` is called with every signal before it takes effect: a driver of worker
    processes passes each one on, so its workers stop as it does (``apf-ray reproduce``).
    """

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.on_signal = on_signal
        self.signum: int | None = None
        self.graceful = False  # False: a signal stops at once; True: the first one lets the round finish
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def signal_of(self, interrupt: KeyboardInterrupt) -> int:
        """The signal behind ``interrupt``: an :class:`Abandon`'s own, else the first one seen —
        a blocking Ray call (``ray.get``, ``ray.init``) re-raises the handler's Abandon as a plain
        KeyboardInterrupt, which is why callers catch KeyboardInterrupt, not Abandon."""
        return getattr(interrupt, "signum", None) or self.signum or signal.SIGINT

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.on_signal is not None:
            self.on_signal(signum)
        first = self.signum is None
        if first:
            self.signum = signum
            if self.graceful:
                return
        raise Abandon(signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
