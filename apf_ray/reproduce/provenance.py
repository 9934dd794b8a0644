"""Where and when the reproduction ran: machine, software, niceness and load.

Times depend on the machine and on what else runs on it (the project's machines are shared),
so the report states the CPUs, the versions, the niceness and the 1-minute load average
sampled during the work. Bytes and accuracy do not depend on it. (``bench/provenance.py``
does the same for the benchmark scripts, which live outside the package.)
"""

from __future__ import annotations

import os
import platform
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOAD_SAMPLE_S = 5.0  # how often the 1-minute load average is sampled, seconds


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    """CPUs, memory, niceness and the versions of torch and numpy."""
    versions = {}
    for name in ("torch", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), None) if cpuinfo.is_file() else None
    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), **versions, "nice": os.nice(0)}


class LoadSampler:
    """The 1-minute load average every few seconds while the block runs."""

    def __init__(self, every_s: float = LOAD_SAMPLE_S) -> None:
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
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
        samples = self.samples or [self.start[0], self.end[0]]
        return {"start_1_5_15min": [round(x, 2) for x in self.start],
                "end_1_5_15min": [round(x, 2) for x in self.end],
                "mean_1min_during": round(sum(samples) / len(samples), 2), "max_1min_during": round(max(samples), 2)}
