"""The reproduction's report: ``reproduce.json``, then its PNG plots and ``report.md`` from it.

Three stages, each a module: :mod:`.summary` reads the run folders under ``OUTPUT/runs/`` and
returns every number and plotted series (``reproduce.json``); :mod:`.figures` draws the plots
and :mod:`.markdown` writes ``report.md`` from that file's content alone, so
:func:`render_report` makes both again from ``reproduce.json`` without the runs. An experiment
not run yet says how to run it. The report can be rebuilt from the runs at any time
(``apf-ray reproduce --report-only``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from reproduce.figures import draw_figures
from reproduce.markdown import render
from reproduce.plan import Plan
from reproduce.summary import summarise

RESULT_FILE = "reproduce.json"
REPORT_FILE = "report.md"


def write_report(plan: Plan, out: Path, *, statuses: dict[str, str], meta: dict[str, Any],
                 overhead: dict[str, Any] | None) -> dict[str, Any]:
    """Write ``configs/*.yaml``, ``reproduce.json``, the PNGs and ``report.md`` into ``out``; returns the JSON."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    for key, spec in plan.runs.items():
        (configs / f"{key}.yaml").write_text(yaml.safe_dump(spec.config, sort_keys=False))
    result = _finite(summarise(plan, out, statuses=statuses, meta=meta, overhead=overhead))
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    render_report(out)
    return result


def render_report(out: Path) -> list[str]:
    """The plots and ``report.md`` in ``out``, made from ``out/reproduce.json`` alone; the plots' names."""
    data = json.loads((Path(out) / RESULT_FILE).read_text())
    plots = draw_figures(data, Path(out))
    (Path(out) / REPORT_FILE).write_text(render(data))
    return plots


def _finite(x: Any) -> Any:
    """NaN and infinities (e.g. a percentile of nothing) become None, numpy scalars Python's: strict JSON
    that reads back as what was written, so the figures and the report are the same from the file."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    if isinstance(x, np.generic):
        return _finite(x.item())
    return x
