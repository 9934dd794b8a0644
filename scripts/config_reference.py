"""Write ``docs/CONFIG.md``, the config reference, from the pydantic models that validate configs.

Every field of a train config (``apf_ray.config.ExperimentConfig``), of every registered
strategy's and uplink stage's ``Options``, and of a search file (``apf_ray.tuning.TuneSpec``)
is one table row: its dotted key, type, default (what the built-in default workload uses),
allowed range and description — read from the models, so the reference cannot drift from what
is validated. A test renders it again and compares with the committed file.

    python3 scripts/config_reference.py            # rewrite docs/CONFIG.md
    python3 scripts/config_reference.py --check    # exit 1 when docs/CONFIG.md is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "docs" / "CONFIG.md"
COMMAND = "python3 scripts/config_reference.py"

_BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "≤"),
           (annotated_types.Lt, "lt", "<"), (annotated_types.MinLen, "min_length", "at least"),
           (annotated_types.MaxLen, "max_length", "at most"))


def _model_in(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """The model a field nests (``(PoolConfig, "[]")`` for ``list[PoolConfig]``), or None for a leaf."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, ""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0], "[]"
    return None


def type_name(annotation: Any) -> str:
    """``int or `auto```, ``float or null``, ``list[...]``: the YAML a field takes, briefly (no ``|``: it
    would split a Markdown table's cell)."""
    if annotation is type(None):
        return "null"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: Any) -> str:
    """The field's range from its ``Field(ge=..., gt=...)`` metadata: ``≥ 0, < 1``."""
    out = []
    for meta in field.metadata:
        for kind, attr, symbol in _BOUNDS:
            if isinstance(meta, kind):
                out.append(f"{symbol} {getattr(meta, attr)}")
    return ", ".join(out)


def _cell(value: Any) -> str:
    return "`" + json.dumps(value, ensure_ascii=False) + "`" if value is not PydanticUndefined else "required"


def _default(field: Any) -> Any:
    if field.default_factory is not None:
        made = field.default_factory()
        return made.model_dump(mode="json") if isinstance(made, BaseModel) else made
    return field.default.model_dump(mode="json") if isinstance(field.default, BaseModel) else field.default


def rows(model: type[BaseModel], prefix: str = "", defaults: dict[str, Any] | None = None) -> list[list[str]]:
    """One row per leaf field, nested models flattened to dotted keys; ``defaults`` (the parent's
    default value of this section, where it sets its own) wins over the field's own default."""
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        default = defaults[name] if defaults is not None and name in defaults else _default(field)
        nested = _model_in(field.annotation)
        if nested is not None:
            sub, suffix = nested
            if suffix:  # a list of sections: its default items, then each item's keys
                out.append([f"`{key}`", "list of mappings", _cell(default), bounds(field),
                            (field.description or "").replace("|", "\\|")])
            out += rows(sub, f"{key}{suffix}.", default if suffix == "" else None)
            continue
        out.append([f"`{key}`", type_name(field.annotation), _cell(default), bounds(field),
                    (field.description or "").replace("|", "\\|")])
    return out


def table(model: type[BaseModel], prefix: str = "") -> str:
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows(model, prefix)]
    return "\n".join(lines)


def _doc(cls: type) -> str:
    """The class docstring's first paragraph, Sphinx roles (``:data:`X```) as plain code, and a blank line."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " "))
    return f"{text}\n\n" if text else ""


def render() -> str:
    """The whole reference, as Markdown."""
    from apf_ray.compression import UPLINK_STAGES
    from apf_ray.config import ExperimentConfig
    from apf_ray.strategies import STRATEGIES
    from apf_ray.tuning import TuneSpec

    parts = [
        "# Config reference",
        f"Generated from the pydantic models by `{COMMAND}` (a test checks this file is up to date): do not "
        "edit by hand. A config file sets any of these keys as nested YAML; `--set key=value` sets one by its "
        "dotted key (values parsed as YAML). Defaults are the built-in default workload's "
        "(`configs/digits-lenet5.yaml`). How the pieces fit together: [the user guide](GUIDE.md).",
        "## Train config (`apf-ray train`, `compare`, `reproduce`'s runs)",
        "`cluster.pools[]` keys are per pool (a list of mappings).",
        table(ExperimentConfig),
        "## `strategy.options`, per strategy",
        "Validated against the options model of the strategy `strategy.name` names; changing `strategy.name` "
        "starts the options from the new strategy's defaults. The `strategy` table above shows `apf`'s options "
        "as the default workload sets them.",
    ]
    for name, cls in sorted(STRATEGIES.items()):
        fields = cls.Options.model_fields
        parts.append(f"### `{name}`\n\n{_doc(cls)}"
                     + (table(cls.Options, "strategy.options.") if fields else "No options."))
    parts += ["## `strategy.uplink` stages",
              "A list of at most one sparsifier then at most one quantiser; each item a name (`int8`) or a "
              "mapping of its name and options (`{name: topk, ratio: 0.1}`)."]
    for name, cls in sorted(UPLINK_STAGES.items()):
        options = getattr(cls, "Options", None)
        body = table(options, "") if options is not None and options.model_fields else "No options."
        parts.append(f"### `{name}` ({cls.kind})\n\n{_doc(cls)}{body}")
    parts += ["## Search file (`apf-ray tune --config`)",
              "A search domain (`search_space.KEY`, `scheduler.mutations.KEY`) gives exactly one of "
              "`uniform: [low, high]`, `loguniform: [low, high]`, `quniform: [low, high, q]`, "
              "`randint: [low, high)`, `choice: [...]`, `grid: [...]`; `objective` is a list of "
              "`{metric, mode, last_n}`.",
              table(TuneSpec)]
    return "\n\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if docs/CONFIG.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = OUTPUT.read_text() if OUTPUT.is_file() else ""
        sys.exit(0 if current == text else f"docs/CONFIG.md differs from the config models; run {COMMAND}")
    OUTPUT.write_text(text)
    print(f"{OUTPUT.relative_to(REPO)}: {text.count(chr(10))} lines")


if __name__ == "__main__":
    main()
