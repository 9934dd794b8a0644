"""The two ways a run ends early on purpose: it could not start, or a signal stopped it.

Both carry a one-line message for the command line (``error: ...`` with exit status 2, or
the stop notice with 128 + the signal's number), so a user never reads a Ray traceback for a
mistake in their config, data or checkpoint.
"""

from __future__ import annotations

import difflib
import reprlib
import signal
from collections.abc import Iterable
from pathlib import Path

EXCERPT_CHARS = 80
"""The most characters of a user's value an error message quotes (a value may be megabytes)."""

_BOUNDED_REPR = reprlib.Repr()
"""``repr`` that stops early: bounded work even for a deeply nested or self-referencing value."""
_BOUNDED_REPR.maxlevel = 3
_BOUNDED_REPR.maxtuple = _BOUNDED_REPR.maxlist = _BOUNDED_REPR.maxdict = _BOUNDED_REPR.maxset = 4
_BOUNDED_REPR.maxstring = _BOUNDED_REPR.maxother = EXCERPT_CHARS


def clip(text: str, limit: int = EXCERPT_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters; ``…`` marks a cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (:func:`clip`), computed in bounded time."""
    return clip(_BOUNDED_REPR.repr(value), limit)


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the closest of ``known`` to a mistyped ``word``, else ``""``."""
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def describe(err: BaseException) -> str:
    """One line for ``err``: its message, prefixed by its type unless that is a plain value error."""
    text = " ".join(part.strip() for part in str(err).splitlines() if part.strip()) or type(err).__name__
    if isinstance(err, (ValueError, FileNotFoundError, SetupError)):
        return text
    return f"{type(err).__name__}: {text}"


class SetupError(ValueError):
    """The run could not start (config, data, model, checkpoint, cluster); nothing was written."""


class Stopped(Exception):
    """SIGINT or SIGTERM stopped a command; ``message`` says what was kept and how to go on."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum = signum
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self)

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as a shell reports a process ended by that signal (130, 143)."""
        return 128 + int(self.signum)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


class RunStopped(Stopped):
    """SIGINT or SIGTERM stopped the run.

    ``round`` is the last checkpointed round. A first signal lets the round in flight finish
    and checkpoints it (``abandoned`` False); a second one stops at once, leaving the last
    checkpoint written before it. ``resume`` is the command that continues it (by default
    ``apf-ray train --resume RUN_DIR``; a command running several runs names itself, see
    :meth:`within`).
    """

    def __init__(self, round_done: int, signum: int, run_dir: Path, *, abandoned: bool = False,
                 checkpointed: bool = True, resume: str | None = None, what: str = "") -> None:
        self.signum, self.round, self.run_dir = signum, round_done, Path(run_dir)
        self.abandoned, self.checkpointed = abandoned, checkpointed
        self.resume, self.what = resume, what
        super().__init__(signum, self._message())

    def within(self, resume: str, what: str) -> RunStopped:
        """The same stop, told as part of a larger command: ``what`` stopped, ``resume`` continues it."""
        return RunStopped(self.round, self.signum, self.run_dir, abandoned=self.abandoned,
                          checkpointed=self.checkpointed, resume=resume, what=what)

    def _message(self) -> str:
        what = f"{self.what} " if self.what else ""
        head = "abandoned the round in flight (second signal); " if self.abandoned else ""
        if not self.checkpointed:
            if self.resume is None:
                return f"{head}stopped by {self.signal_name} before any checkpoint was written; nothing to resume"
            return f"{head}stopped {what}by {self.signal_name} before its first checkpoint; resume with {self.resume}"
        resume = f"resume with {self.resume or f'apf-ray train --resume {self.run_dir}'}"
        if self.abandoned:
            return f"{head}stopped {what}after round {self.round}, the last checkpoint; {resume}"
        return f"stopped {what}after round {self.round}; {resume}"
