"""Benchmark APFController.update: time per call, state bytes and peak extra memory.

For each size the global vector follows a random walk in which half the scalars oscillate
around a fixed point (APF-stable: their updates cancel) and half drift one way (unstable),
with Gaussian noise on both; frozen scalars are held fixed as in training. A stability
check runs on every call (check_every = 1, the default), i.e. the worst case.

    PYTHONPATH=. python3 bench/controller.py [--sizes 61706,11173962,100000000]
                                             [--repeat N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from provenance import RESULTS, LoadSampler, command, machine, now

from apf_ray.controller import APFController

DEFAULT_SIZES = (61_706, 11_173_962, 100_000_000)  # LeNet-5, ResNet-18, 100M
STEP = 1e-2  # mean |update| per round of a scalar
NOISE = 2e-4  # standard deviation of the per-round noise
WARMUP_ROUNDS = 30  # with α = 0.99, A needs ~25 rounds before oscillating scalars freeze
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


class RandomWalk:
    """The global vector round after round; buffers reused so 100M fits in memory.

    An oscillating scalar reverses its own direction each round it is trained, so its
    phase survives a freeze (frozen scalars neither move nor flip).
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.params = self.rng.standard_normal(n, dtype=np.float32)
        self.oscillating = np.arange(n) % 2 == 0
        self.direction = np.ones(n, dtype=np.int8)
        self.flip = np.empty(n, dtype=bool)
        self.step = np.empty(n, dtype=np.float32)

    def advance(self, mask: np.ndarray) -> np.ndarray:
        """Params after one round in which only ``mask`` (True = active) scalars moved."""
        self.rng.standard_normal(dtype=np.float32, out=self.step)
        self.step *= NOISE / STEP
        self.step += self.direction
        self.step *= STEP
        self.step *= mask
        self.params += self.step
        np.logical_and(self.oscillating, mask, out=self.flip)
        self.direction *= 1 - 2 * self.flip.view(np.int8)
        return self.params


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


def peak_rss_during(call) -> tuple[int, object]:
    """Extra resident bytes at the peak of ``call()``, sampled every 0.2 ms by a thread
    (numpy releases the GIL in its loops); returns (extra bytes, call's result)."""
    baseline = resident_bytes()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = call()
    finally:
        done.set()
        sampler.join()
    return max(peak, resident_bytes()) - baseline, result


def peak_traced_during(call) -> tuple[int, object]:
    """Peak bytes allocated (numpy buffers included) while ``call()`` runs."""
    tracemalloc.start()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result


def bench_size(n: int, repeat: int) -> dict:
    walk = RandomWalk(n)
    controller = APFController(walk.params)
    mask = controller.active
    for _ in range(WARMUP_ROUNDS):
        mask = controller.update(walk.advance(mask))

    seconds = []
    for _ in range(repeat):
        params = walk.advance(mask)
        start = time.perf_counter()
        mask = controller.update(params)
        seconds.append(time.perf_counter() - start)

    params = walk.advance(mask)
    traced, mask = peak_traced_during(lambda: controller.update(params))
    params = walk.advance(mask)
    rss, mask = peak_rss_during(lambda: controller.update(params))

    median = statistics.median(seconds)
    return {
        "num_params": n,
        "update_seconds_median": median,
        "update_seconds_all": seconds,
        "update_ns_per_param": median / n * 1e9,
        "state_bytes_per_param": controller.state_nbytes / n,
        "peak_extra_traced_bytes_per_param": traced / n,
        "peak_extra_rss_bytes_per_param": rss / n,
        "frozen_fraction": controller.frozen_fraction,
        "threshold": controller.threshold,
        "num_checks": controller.num_checks,
    }


def print_table(rows: list[dict]) -> None:
    header = (f"{'params':>12} {'update ms':>10} {'ns/param':>9} {'state B/p':>10} "
              f"{'traced B/p':>11} {'RSS B/p':>8} {'frozen':>7}")
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['num_params']:>12,} {row['update_seconds_median'] * 1e3:>10.1f} "
              f"{row['update_ns_per_param']:>9.2f} {row['state_bytes_per_param']:>10.2f} "
              f"{row['peak_extra_traced_bytes_per_param']:>11.2f} "
              f"{row['peak_extra_rss_bytes_per_param']:>8.2f} {row['frozen_fraction']:>7.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                        help="comma-separated parameter counts")
    parser.add_argument("--repeat", type=int, default=5, help="timed update calls per size")
    parser.add_argument("--json", type=Path, default=RESULTS / "controller.json")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")

    with LoadSampler() as load:
        rows = [bench_size(n, args.repeat) for n in sizes]
    print_table(rows)
    report = {
        "benchmark": "APFController.update, check every call, default hyperparameters",
        "walk": {"step": STEP, "noise": NOISE, "oscillating_fraction": 0.5,
                 "warmup_rounds": WARMUP_ROUNDS},
        "repeat": args.repeat,
        "command": command(), "date": now(), "machine": machine(), "load_average": load.report(),
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
