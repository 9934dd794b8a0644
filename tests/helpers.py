"""Small configs and callbacks shared by the integration tests (real data, real training, a few rounds)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from apf_ray.callbacks import Callback
from apf_ray.config import ExperimentConfig, build_config
from apf_ray.records import RoundEvent


def load_script(path: Path) -> ModuleType:
    """A script of the repository's (``bench/``, ``scripts/``: not packages) imported as a module, as
    when it runs: its folder heads ``sys.path`` while it loads (it imports its neighbours, e.g.
    ``provenance``), and it is in ``sys.modules`` under its name (dataclasses look it up there)."""
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(folder)


def tiny_config(*overrides: str, rounds: int = 4) -> ExperimentConfig:
    """Digits + LeNet-5, 6 clients with 2 label shards, 3 per round, 3 local steps."""
    raw = {
        "name": "tiny",
        "seed": 7,
        "data": {"dataset": "digits", "partitioner": "shards", "num_clients": 6,
                 "partition_options": {"shards_per_client": 2}},
        "model": {"name": "lenet5"},
        "train": {"rounds": rounds, "clients_per_round": 3, "local_steps": 3, "batch_size": 16, "lr": 0.05,
                  "momentum": 0.9, "weight_decay": 1e-4},
        "strategy": {"name": "apf", "options": {"threshold": 0.5, "alpha": 0.5}},
        "cluster": {"pools": [{"name": "cpu", "num_actors": 2, "num_cpus": 0.5}], "round_timeout_s": 120},
        "output": {"checkpoint_every": 2, "tensorboard": True, "plots": False},
    }
    return build_config(raw, list(overrides))


class Crash(RuntimeError):
    """Raised by :class:`CrashAfter` to simulate a driver dying mid-run."""


class CrashAfter(Callback):
    """Raises :class:`Crash` after ``rounds`` rounds of this call (whatever was checkpointed stays)."""

    def __init__(self, rounds: int) -> None:
        self.left = rounds

    def on_round(self, event: RoundEvent) -> None:
        self.left -= 1
        if self.left == 0:
            raise Crash(f"simulated crash after round {event.record.round}")


def start_ray_backend(cfg: ExperimentConfig, run_dir: Path):
    """A started :class:`RayBackend` on the Ray session this process holds; ``.server`` is the actor.

    Tests drive the actor directly (``backend.server.run_round.remote()``) to act mid-round.
    """
    from actors.backend import RayBackend
    from apf_ray.workload import build_workload

    backend = RayBackend()
    info = backend.start(cfg, Path(run_dir), build_workload(cfg), None)
    return backend, info


def png_contents(path: Path) -> dict:
    """What a PNG this package saved draws (``apf_ray.metrics.figure_contents``, from its metadata),
    after checking the file is a whole PNG image."""
    import json

    from PIL import Image

    from apf_ray.metrics import PNG_CONTENTS_KEY

    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # reads every chunk: a truncated file fails here
        return json.loads(image.text[PNG_CONTENTS_KEY])
