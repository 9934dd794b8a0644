"""Where and when a benchmark ran: every result file in ``docs/results/`` records it.

Timings depend on the machine and on what else ran on it (this project's machines are shared),
so each file states the CPUs, the software versions, the niceness and the 1-minute load
average before, during and after the measurement. Bytes and accuracy do not depend on it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
LOAD_SAMPLE_S = 5.0  # how often the 1-minute load average is sampled, seconds


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    """The command line that made a result, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(RESULTS.parent.parent)
    return " ".join(["python3", str(script), *sys.argv[1:]])


def code() -> str:
    """``commit abc1234`` (``+ uncommitted changes`` when the tree differs): the code that measured."""
    import subprocess

    repo = RESULTS.parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return f"commit {head.stdout.strip()}" + (" + uncommitted changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """CPUs, memory and software versions of this machine (imports torch, Ray and numpy if installed)."""
    versions = {}
    for name in ("torch", "ray", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), None) if cpuinfo.is_file() else None
    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), **versions, "nice": os.nice(0),
            "note": "shared machine: other developers' jobs ran at the same time (see load_average)"}


class LoadSampler:
    """The 1-minute load average every few seconds while the block runs (a busy machine stretches times)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(LOAD_SAMPLE_S):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self.start = os.getloadavg()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = os.getloadavg()

    def report(self) -> dict[str, Any]:
        mean = sum(self.samples) / len(self.samples) if self.samples else self.end[0]
        return {"start_1_5_15min": [round(x, 2) for x in self.start],
                "end_1_5_15min": [round(x, 2) for x in self.end],
                "mean_1min_during": round(mean, 2), "max_1min_during": round(max(self.samples, default=mean), 2)}
