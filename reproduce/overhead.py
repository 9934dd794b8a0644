"""Table III: what APF costs per round, measured apart from the runs (no other run of ours going).

* Server: the controller's ``update`` (a stability check every round) on the model's real
  parameter vector, moved each call by a random walk in which half the scalars oscillate;
  its state is 16 bytes per parameter.
* Client: one round of local training (the workload's steps, batch and optimiser) on real
  data, with APF's mask (half the scalars frozen) against FedAvg's unmasked step,
  interleaved so that both see the same machine load; the median of each.
* Memory: the controller's state against the model + gradient (+ momentum) memory of one
  copy of the model, and the client's extra (a 1-byte bool per scalar for the mask).

The runs' own numbers (the controller timed inside each APF run, FedAvg's and APF's mean
per-client compute, the process's peak RSS) are read by the report next to these.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from apf_ray.config import build_config
from apf_ray.provenance import LoadSampler, machine, now
from reproduce.plan import Plan


def _median(xs: list[float]) -> float:
    return float(np.median(np.asarray(xs)))


def measure_model(base: dict[str, Any], *, reps: int, controller_calls: int, samples: int = 2000) -> dict[str, Any]:
    """Controller and local-step timings, and memory, for one workload (seconds, bytes)."""
    import torch

    from apf_ray.controller import APFController
    from apf_ray.data import load_dataset
    from apf_ray.flat import get_buffers, get_params
    from apf_ray.training import TrainSettings, train_local
    from apf_ray.workload import model_factory

    cfg = build_config(base)
    torch.set_num_threads(1)
    ds = load_dataset(cfg.data.dataset, **cfg.data.options)
    torch.manual_seed(cfg.seed)
    model = model_factory(cfg, ds.num_classes, ds.input_shape)()
    params, buffers = get_params(model), get_buffers(model)
    n = params.size
    rng = np.random.default_rng(0)

    o = cfg.strategy.options
    controller = APFController(params, alpha=o["alpha"], threshold=o["threshold"], seed=0)
    w = params.copy()
    drift = (rng.random(n) < 0.5).astype(np.float32)  # half drift one way, half oscillate
    seconds = []
    for call in range(controller_calls + 3):
        step = rng.normal(0.0, 1e-3, n).astype(np.float32)
        w += drift * np.abs(step) + (1 - drift) * step * (1 if call % 2 else -1)
        start = time.perf_counter()
        controller.update(w)
        if call >= 3:  # the first calls warm the caches
            seconds.append(time.perf_counter() - start)

    t = cfg.train
    settings = TrainSettings(t.local_steps, t.batch_size, t.lr, t.momentum, t.weight_decay)
    x, y = ds.x_train[:samples], ds.y_train[:samples]
    mask = rng.random(n) < 0.5
    plain, masked = [], []
    train_local(model, x, y, params=params, buffers=buffers, mask=None, settings=settings, seed=0)  # warm-up
    for rep in range(reps):
        order = ((None, plain), (mask, masked)) if rep % 2 == 0 else ((mask, masked), (None, plain))
        for m, out in order:
            out.append(train_local(model, x, y, params=params, buffers=buffers, mask=m, settings=settings,
                                   seed=rep).compute_s)
    optimizer_copies = 2 + (1 if t.momentum else 0)  # weights, gradients, momentum
    model_bytes = optimizer_copies * 4 * n + 4 * buffers.size
    return {
        "num_params": int(n),
        "controller_update_s": _median(seconds),
        "controller_calls": len(seconds),
        "controller_state_bytes": int(controller.state_nbytes),
        "local_round_s_fedavg": _median(plain),
        "local_round_s_apf": _median(masked),
        "local_round_reps": reps,
        "local_steps": t.local_steps,
        "batch_size": t.batch_size,
        "frozen_fraction": float(1 - mask.mean()),
        "model_optimizer_bytes": int(model_bytes),
        "client_mask_bytes": int(n),  # one torch.bool per scalar while training
    }


def measure_overhead(plan: Plan, say=print) -> dict[str, Any]:
    """Every workload's :func:`measure_model` under ``models``, with when, where and at what load it was
    measured: the runs it is read beside may have trained on another day or machine."""
    quick = plan.scale == "quick"
    models = {}
    with LoadSampler() as load:
        for model in plan.workloads:
            reps = {"lenet5": 10, "lstm": 6, "resnet18": 3}[model] if not quick else 2
            calls = {"lenet5": 50, "lstm": 30, "resnet18": 10}[model] if not quick else 5
            say(f"Table III: timing {model} (controller × {calls}, local round × {reps} each way)")
            models[model] = measure_model(plan.workloads[model].base, reps=reps, controller_calls=calls)
    return {"scale": plan.scale, "date": now(), "machine": machine(), "load_average": load.report(), "models": models}
