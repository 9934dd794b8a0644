"""Optuna samplers that survive Ray Tune's pickling of a search.

Ray Tune pickles the searcher with the rest of the Tuner's state when a search starts
(``tuner.pkl``, cloudpickle) and again every time it saves the experiment state
(``OptunaSearch.save``, the standard pickle), so ``apf-ray tune --resume`` can restore it.
Optuna 5's genetic samplers (``NSGAIISampler``) hold a ``threading.Lock`` guarding their
generation cache, which no pickle can hold: every NSGA-II search failed with ``cannot pickle
'_thread.lock' object`` as it started. The sampler here leaves the lock out of its pickled
state and makes a new one when unpickled; the cache it guards is pickled with the rest, so an
unpickled sampler proposes what the original would have.

This module imports Optuna, so it is imported only by searches that use it.
"""

from __future__ import annotations

import threading
from typing import Any

from optuna.samplers import NSGAIISampler


class PicklableNSGAIISampler(NSGAIISampler):
    """Optuna's NSGA-II sampler, picklable: its thread lock is recreated, not pickled."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


__all__ = ["PicklableNSGAIISampler"]
