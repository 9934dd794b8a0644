"""Where and when a measurement ran: machine, software, niceness and load.

Times depend on the machine and on what else runs on it (this project's machines are shared),
so every result (``apf-ray reproduce``'s report, the ``bench/`` scripts' files in
``docs/results/``) states the CPUs, the software versions, the niceness and the 1-minute load
average sampled during the work. Bytes and accuracy do not depend on it.
"""

from __future__ import annotations

import os
import platform
import threading
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

LOAD_SAMPLE_S = 5.0  # how often the 1-minute load average is sampled, seconds
PACKAGES = ("torch", "ray", "numpy")  # versions recorded (read from package metadata: nothing is imported)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
    """CPUs, memory (GiB), platform, niceness and the versions of torch, Ray and numpy (None: absent)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), None) if cpuinfo.is_file() else None
    return {"cpus": os.cpu_count(), "cpu_model": model or platform.processor(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), **versions, "nice": os.nice(0)}


class LoadSampler:
    """The 1-minute load average every few seconds while the block runs (a busy machine stretches times)."""

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
        """Load at the start and end (1, 5, 15 min) and the mean and max of the samples taken during the block."""
        samples = self.samples or [self.start[0], self.end[0]]
        return {"start_1_5_15min": [round(x, 2) for x in self.start],
                "end_1_5_15min": [round(x, 2) for x in self.end],
                "mean_1min_during": round(sum(samples) / len(samples), 2), "max_1min_during": round(max(samples), 2)}
