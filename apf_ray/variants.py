"""Strategy variants for ``apf-ray compare``: ``name[:key=value,...][+stage[:key=value,...]]...``.

``apf:aggressive_prob=0.3`` sets options of the strategy (merged into the config's when it is
the config's strategy); each ``+stage`` adds an uplink processor, e.g. ``fedavg+topk:ratio=0.1``
or ``apf+topk:ratio=0.1+int8``. Values are parsed as YAML.

A comparison saves its plan (base config and variants) in its folder first, so a stopped one
is finished by ``apf-ray compare --resume DIR`` with exactly the variants it started with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def _named(spec: str, part: str) -> tuple[str, dict[str, Any]]:
    name, _, rest = part.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"strategy variant {spec!r}: expected key=value, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    if not name.strip():
        raise ValueError(f"strategy variant {spec!r}: a name is missing before {part!r}")
    return name.strip(), options


def variant_overrides(spec: str, base_strategy: str) -> dict[str, Any]:
    """Dotted overrides that turn a config's strategy into the variant ``spec``."""
    head, *stages = spec.split("+")
    name, options = _named(spec, head)
    overrides: dict[str, Any] = {"strategy.name": name}  # a new name starts from that strategy's defaults
    if name == base_strategy:
        overrides.update({f"strategy.options.{k}": v for k, v in options.items()})
    else:
        overrides["strategy.options"] = options
    if stages:
        uplink = []
        for stage in stages:
            stage_name, stage_options = _named(spec, stage)
            uplink.append({"name": stage_name, **stage_options} if stage_options else stage_name)
        overrides["strategy.uplink"] = uplink
    return overrides


def variant_dirname(spec: str) -> str:
    """A file-system-safe folder name for a variant's run."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec)


PLAN_FILE = "compare-plan.yaml"
"""What ``apf-ray compare`` saves in its folder before any variant runs, so ``--resume`` can finish it."""

DEFAULT_STRATEGIES = ("fedavg", "apf", "apf:aggressive_prob=0.3")


def save_plan(out: Path, config: dict[str, Any], strategies: Sequence[str]) -> Path:
    """Write the comparison's base config and variants (in order; the first is the baseline) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / PLAN_FILE
    path.write_text(yaml.safe_dump({"strategies": list(strategies), "config": config}, sort_keys=False))
    return path


def load_plan(out: Path) -> tuple[dict[str, Any], list[str]]:
    """The base config and variants a stopped ``apf-ray compare`` saved in ``out``; ValueError if none."""
    path = Path(out) / PLAN_FILE
    if not path.is_file():
        raise ValueError(f"{out} holds no comparison to resume (no {PLAN_FILE}, which apf-ray compare "
                         "writes before its first variant)")
    plan = yaml.safe_load(path.read_text())
    if not isinstance(plan, dict) or not isinstance(plan.get("config"), dict) or not plan.get("strategies"):
        raise ValueError(f"{path} is not a comparison plan (expected the keys strategies and config)")
    return plan["config"], [str(s) for s in plan["strategies"]]
