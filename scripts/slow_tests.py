#!/usr/bin/env python3
"""Choose the tests the fast lane leaves out, from the durations of one whole-suite run.

    python3 -m pytest -q --junitxml=/tmp/durations.xml      # the whole suite, once
    python3 scripts/slow_tests.py /tmp/durations.xml        # rewrites tests/slow_tests.txt

The slowest tests are marked ``slow`` one by one until the rest takes at most ``--share`` of the
whole run's test time (a share, not seconds, so that a busy or fast machine chooses the same
tests); a module's last remaining test is never taken, so the fast lane,
``python3 -m pytest -m "not slow"``, still runs every module. ``tests/conftest.py`` reads the
list; tests decorated ``@pytest.mark.slow`` stay slow whatever it says.
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLOW_TESTS = REPO / "tests" / "slow_tests.txt"
HEADER = """\
# The tests the fast lane (python3 -m pytest -m "not slow") leaves out: seconds each took in a
# whole-suite run, then its pytest node id. Made by scripts/slow_tests.py (read it for the rule)
# from {source}: whole suite {total:.0f} s of test time, the fast lane keeps {kept:.0f} s ({share:.0%}).
"""


def node_id(classname: str, name: str) -> str:
    """pytest's node id from a JUnit ``classname`` (``tests.test_x.TestY``) and test ``name``."""
    parts = classname.split(".")
    for end in range(len(parts), 0, -1):
        path = Path(*parts[:end]).with_suffix(".py")
        if (REPO / path).is_file():
            return "::".join([path.as_posix(), *parts[end:], name])
    raise ValueError(f"no test file for JUnit classname {classname!r}")


def durations(junit: Path) -> dict[str, float]:
    """``{node id: seconds}`` of every test case that ran (skipped ones left out)."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        if case.find("skipped") is None:
            found[node_id(case.get("classname"), case.get("name"))] = float(case.get("time"))
    return found


def choose(times: dict[str, float], share: float) -> dict[str, float]:
    """The slowest tests, until the others take at most ``share`` of the total; one per module kept."""
    left = Counter(node.split("::")[0] for node in times)
    budget, kept = share * sum(times.values()), sum(times.values())
    slow = {}
    for node, seconds in sorted(times.items(), key=lambda item: -item[1]):
        if kept <= budget:
            break
        module = node.split("::")[0]
        if left[module] > 1:
            slow[node] = seconds
            left[module] -= 1
            kept -= seconds
    return slow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit", type=Path, help="JUnit XML of a whole-suite run (pytest --junitxml=FILE)")
    parser.add_argument("--share", type=float, default=0.1,
                        help="the most of the whole suite's test time the fast lane may take (default 0.1)")
    args = parser.parse_args()
    times = durations(args.junit)
    slow = choose(times, args.share)
    total, kept = sum(times.values()), sum(times.values()) - sum(slow.values())
    lines = [f"{seconds:7.1f}  {node}" for node, seconds in sorted(slow.items())]
    SLOW_TESTS.write_text(HEADER.format(source=args.junit.name, total=total, kept=kept, share=kept / total)
                          + "\n".join(lines) + "\n")
    print(f"{len(slow)} of {len(times)} tests marked slow; the fast lane keeps {kept:.0f} s of {total:.0f} s")


if __name__ == "__main__":
    main()
