"""Where and when a benchmark ran: every result file in ``docs/results/`` records it.

The machine, the versions and the load come from :mod:`apf_ray.provenance` (shared with
``apf-ray reproduce``); this module adds what only the scripts under ``bench/`` need: where
results go, the command line that made one, and the commit that measured it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the scripts run from a checkout, whether or not it is pip-installed
    sys.path.insert(0, str(REPO))

from apf_ray.provenance import LoadSampler, now  # noqa: E402
from apf_ray.provenance import machine as _machine  # noqa: E402

RESULTS = REPO / "docs" / "results"

__all__ = ["RESULTS", "LoadSampler", "code", "command", "machine", "now"]


def command() -> str:
    """The command line that made a result, as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(RESULTS.parent.parent)
    return " ".join(["python3", str(script), *sys.argv[1:]])


def code() -> str:
    """``commit abc1234`` (``+ uncommitted changes`` when the tree differs): the code that measured."""
    repo = RESULTS.parent.parent
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    return f"commit {head.stdout.strip()}" + (" + uncommitted changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    """:func:`apf_ray.provenance.machine`, noting that the machine is shared."""
    return {**_machine(), "note": "shared machine: other developers' jobs ran at the same time (see load_average)"}
