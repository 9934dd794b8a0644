"""Strategy variants for ``apf-ray compare``: ``name[:key=value,...][+stage[:key=value,...]]...``.

``apf:aggressive_prob=0.3`` sets options of the strategy (merged into the config's when it is
the config's strategy); each ``+stage`` adds an uplink processor, e.g. ``fedavg+topk:ratio=0.1``
or ``apf+topk:ratio=0.1+int8``. Values are parsed as YAML.
"""

from __future__ import annotations

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
