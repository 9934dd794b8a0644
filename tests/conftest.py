"""Session-wide test setup: one torch thread (2-core machines), real Ray fixtures, the fast lane.

The fast lane, ``python3 -m pytest -m "not slow"``, leaves out the tests listed in
``tests/slow_tests.txt`` (and those decorated ``@pytest.mark.slow``). The list is one file
rather than decorators spread over the modules because it is one decision: the slowest tests
of a measured whole-suite run, taken out until the rest runs in a few minutes while every
module keeps tests in the lane (``tests/test_install.py`` checks both).

In parallel, ``python3 -m pytest -n N`` (pytest-xdist; worth it on more than 2 cores): each
worker process holds its own Ray clusters on free ports, so tests need no grouping. The workers
run the listed slow tests first, longest first, so that no long test starts last and keeps one
worker busy while the others idle.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

pytest_plugins = ["tests.ray_cluster"]

SLOW_TESTS = Path(__file__).with_name("slow_tests.txt")


def slow_tests() -> dict[str, float]:
    """``{node id: seconds it took in the measured run}`` from ``tests/slow_tests.txt``."""
    slow = {}
    for line in SLOW_TESTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            seconds, node_id = line.split(maxsplit=1)
            slow[node_id] = float(seconds)
    return slow


def pytest_configure(config: pytest.Config) -> None:
    """Before ``-n`` workers start: Ray's auth token, so that no two workers each create one, and
    tests handed out two at a time unless ``--maxschedchunk`` says otherwise.

    xdist's default hands each worker a quarter of its share at once, consecutive tests: with
    the slow tests first, one worker got the four longest and ran them one after another while
    the others ran everything else and then idled (measured). Two at a time, the next free
    worker takes the next longest test.
    """
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        from tests.ray_cluster import ensure_auth_token

        ensure_auth_token()
        if config.option.maxschedchunk is None:
            config.option.maxschedchunk = 1  # xdist keeps two pending per worker even at 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = slow_tests()
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike: xdist requires one order
        items.sort(key=_longest_first(items, slow))  # stable: the rest keep their order


def _longest_first(items: list[pytest.Item], slow: dict[str, float]) -> Callable[[pytest.Item], float]:
    """Sort key: a listed slow test by its seconds, longest first; the others after, as collected.

    A module using ``two_node_cluster`` moves as one block, at its longest test's place: its
    tests must keep their order (no ``local_ray`` test may follow a two-node one there).
    """
    whole_modules: dict[str, float] = {}
    for item in items:
        if "two_node_cluster" in item.fixturenames:
            whole_modules[item.module.__name__] = 0.0
    for item in items:
        if item.module.__name__ in whole_modules:
            whole_modules[item.module.__name__] = max(whole_modules[item.module.__name__], slow.get(item.nodeid, 0.0))
    return lambda item: -whole_modules.get(item.module.__name__, slow.get(item.nodeid, 0.0))
