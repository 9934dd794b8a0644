"""apf-ray: federated learning with Adaptive Parameter Freezing (APF), orchestrated on Ray.

The Python API is what the command line itself uses::

    import apf_ray

    cfg = apf_ray.load_config("configs/digits-lenet5.yaml", ["train.rounds=20"])
    summary = apf_ray.train(cfg, "runs/notebook")          # backend="ray": on a local Ray cluster
    results = apf_ray.Results("runs/notebook")
    results.rounds_frame()                                  # pandas; results.rounds() is pyarrow
    results.plot()                                          # runs/notebook/curves.png

``train`` is :func:`apf_ray.run.run` (the module ``apf_ray.run`` keeps its name, so the
function is exported as ``train``, like the command). Names load on first use, so
``import apf_ray`` stays fast: no torch, Ray or pydantic until they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, str]] = {
    "load_config": ("apf_ray.config", "load_config"),
    "build_config": ("apf_ray.config", "build_config"),
    "ExperimentConfig": ("apf_ray.config", "ExperimentConfig"),
    "ConfigError": ("apf_ray.config", "ConfigError"),
    "train": ("apf_ray.run", "run"),
    "Results": ("apf_ray.results", "Results"),
    "Callback": ("apf_ray.callbacks", "Callback"),
    "RoundEvent": ("apf_ray.records", "RoundEvent"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'apf_ray' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
