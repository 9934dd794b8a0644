"""Session-wide test setup: one torch thread (2-core machines), real Ray fixtures, the fast lane.

The fast lane, ``python3 -m pytest -m "not slow"``, leaves out the tests listed in
``tests/slow_tests.txt`` (and those decorated ``@pytest.mark.slow``). The list is one file
rather than decorators spread over the modules because it is one decision: the slowest tests
of a measured whole-suite run, taken out until the rest runs in a few minutes while every
module keeps tests in the lane (``tests/test_install.py`` checks both).
"""

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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slow = slow_tests()
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
