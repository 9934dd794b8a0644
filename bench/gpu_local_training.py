"""Local training on a GPU: frozen scalars stay bit-identical, and how fast a client round is.

Runs the client's real training path (``apf_ray.training.train_local``) on CUDA when present
(else CPU) for LeNet-5 and ResNet-18 with SGD + momentum + weight decay and half the scalars
frozen, checks the frozen ones bit for bit, and times a local round per model and device.

    python3 bench/gpu_local_training.py [--steps 20] [--json docs/results/gpu_local_training.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from provenance import RESULTS, command, now

from apf_ray.flat import get_buffers, get_params
from apf_ray.models import build_model
from apf_ray.training import TrainSettings, train_local

MODELS = {"lenet5": ((1, 32, 32), 10), "resnet18": ((3, 32, 32), 10)}


def bench_one(name: str, device: str, steps: int, batch: int, samples: int = 512) -> dict:
    shape, classes = MODELS[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, input_shape=shape)
    params, buffers = get_params(model), get_buffers(model)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, *shape), dtype=np.float32)
    y = rng.integers(0, classes, samples).astype(np.int64)
    mask = rng.random(params.size) < 0.5
    settings = TrainSettings(local_steps=steps, batch_size=batch, lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_local(model, x, y, params=params, buffers=buffers, mask=mask, settings=settings, seed=1,
                device=device)  # warm-up (cuDNN autotuning, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = train_local(model, x, y, params=params, buffers=buffers, mask=mask, settings=settings, seed=1,
                      device=device)
    seconds = time.perf_counter() - start
    frozen_identical = out.params[~mask].tobytes() == params[~mask].tobytes()
    moved = float((out.params[mask] != params[mask]).mean())
    return {"model": name, "device": device, "num_params": int(params.size), "steps": steps, "batch": batch,
            "round_s": seconds, "ms_per_step": seconds / steps * 1e3,
            "frozen_bit_identical": bool(frozen_identical), "active_moved_fraction": moved}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", default=str(RESULTS / "gpu_local_training.json"))
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.set_num_threads(1)
    rows = [bench_one(m, d, args.steps, args.batch) for m in MODELS for d in devices]
    print(f"{'model':<10} {'device':<6} {'params':>11} {'ms/step':>9} {'round s':>8} {'frozen bit-identical':>21}")
    for r in rows:
        print(f"{r['model']:<10} {r['device']:<6} {r['num_params']:>11,} {r['ms_per_step']:>9.2f} "
              f"{r['round_s']:>8.3f} {r['frozen_bit_identical']!s:>21}")
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu_threads": 1}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"command": command(), "date": now(), "machine": meta, "results": rows},
                               indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")
    if not all(r["frozen_bit_identical"] for r in rows):
        raise SystemExit("frozen scalars moved during local training")


if __name__ == "__main__":
    main()
