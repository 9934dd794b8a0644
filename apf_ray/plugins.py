"""Resolve a registered name or a user's import path to a class or function.

Every extension point (models, datasets, partitioners, strategies, uplink stages, backends)
accepts either a name from its registry or ``package.module:Attribute`` naming the user's
own implementation, so plugging one in never means editing this package. A config can
therefore name code to import: treat configs as code (README, threat model).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from apf_ray.errors import excerpt


def working_dir_importable() -> None:
    """Let modules in the working directory be imported, as ``python -m apf_ray.cli`` allows.

    The ``apf-ray`` script's own folder, not the working directory, heads ``sys.path``; a user's
    ``my_strategies.py`` beside their config would not import. The working directory is added
    last, so it never shadows an installed package.
    """
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def is_import_path(name: str) -> bool:
    """Whether a plug-in name is an import path (``pkg.mod:Name``, ``pkg.mod.Name``), not a registered name."""
    return isinstance(name, str) and (":" in name or "." in name)


def local_modules(names: Iterable[str], root: Path) -> list[Path]:
    """The files or package folders under ``root`` that the import paths among ``names`` come from.

    What a Ray cluster's other machines lack: the top-level module of each import path, when it
    is found under ``root`` (the working directory) rather than installed.
    """
    root = Path(root).resolve()
    found: list[Path] = []
    for name in names:
        if not is_import_path(name):
            continue
        top = name.partition(":")[0].split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            continue
        where = Path(next(iter(spec.submodule_search_locations))) if spec.submodule_search_locations \
            else Path(spec.origin)
        where = where.resolve()
        if where.is_relative_to(root) and where not in found:
            found.append(where)
    return found


def import_object(path: str, kind: str) -> Any:
    """The object named by ``package.module:Attribute`` (or ``package.module.Attribute``); modules
    in the working directory import too (:func:`working_dir_importable`)."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not (module_name and sep and attr):
        raise ValueError(f"{kind} {excerpt(path)}: an import path must look like 'package.module:Name'")
    working_dir_importable()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{kind} {excerpt(path)}: cannot import module {excerpt(module_name)} ({err})") from err
    obj = getattr(module, attr, None)
    if obj is None:
        raise ValueError(f"{kind} {excerpt(path)}: module {excerpt(module_name)} has no attribute {excerpt(attr)}")
    return obj


def resolve(
    name: str,
    registry: Mapping[str, Any],
    kind: str,
    *,
    check: Callable[[Any], bool] | None = None,
    expected: str = "",
) -> Any:
    """``registry[name]``, or the object at import path ``name``.

    Registry values may themselves be import paths (strings), imported only when used, so
    that e.g. the Ray backend is imported only by runs that ask for it. ``check`` validates
    the resolved object; ``expected`` says what it should have been, for the error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} must be a non-empty name, got {excerpt(name)}")
    if name in registry:
        obj = registry[name]
        if isinstance(obj, str):
            obj = import_object(obj, kind)
    elif is_import_path(name):
        obj = import_object(name, kind)
    else:
        raise ValueError(
            f"unknown {kind} {excerpt(name)}; known: {', '.join(sorted(registry))}, "
            "or an import path 'package.module:Name'"
        )
    if check is not None and not check(obj):
        raise ValueError(f"{kind} {excerpt(name)} is {excerpt(obj)}, not {expected}")
    return obj


def subclass_of(base: type) -> Callable[[Any], bool]:
    """A ``check`` for :func:`resolve`: the object is a subclass of ``base``."""
    return lambda obj: isinstance(obj, type) and issubclass(obj, base)
