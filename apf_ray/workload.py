"""From a config to what a run needs: data, partitions, pool of each client, initial model.

Every entry point (in-process, Ray, Tune, benchmarks) builds the workload here, so the same
seed gives the same partitions and the same initial vector everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from apf_ray.config import ExperimentConfig, PoolConfig
from apf_ray.data import Dataset, load_dataset, make_partitioner
from apf_ray.flat import FlatLayout, get_buffers, get_params, layout_of
from apf_ray.models import build_model


@dataclass
class Workload:
    dataset: Dataset
    partitions: list[np.ndarray]  # per-client train indices
    pool_of_client: list[str]  # pool name of each client, by client id
    init_params: np.ndarray
    init_buffers: np.ndarray
    layout: FlatLayout

    @property
    def num_clients(self) -> int:
        return len(self.partitions)


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """Independent, reproducible stream per (experiment, round, client)."""
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


def sampling_rng(seed: int) -> np.random.Generator:
    """The generator a run draws its rounds' clients from (the server's; checkpointed with it)."""
    return np.random.default_rng(seed)


def sample_clients(rng: np.random.Generator, num_clients: int, k: int) -> list[int]:
    """The sorted ids of the ``k`` clients a round trains, drawn without replacement."""
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def sampling_schedule(seed: int, num_clients: int, k: int, rounds: int) -> list[list[int]]:
    """The clients an uninterrupted run with this seed trains in rounds 1..``rounds``.

    The server draws exactly these (same generator, same calls), so another system fed this
    schedule trains the same clients in the same rounds (``bench/vs_flower.py``).
    """
    rng = sampling_rng(seed)
    return [sample_clients(rng, num_clients, k) for _ in range(rounds)]


def model_factory(cfg: ExperimentConfig, num_classes: int,
                  input_shape: tuple[int, ...]) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        return build_model(cfg.model.name, num_classes=num_classes, input_shape=input_shape, **cfg.model.options)

    return make


def assign_pools(num_clients: int, pools: list[PoolConfig]) -> list[str]:
    """Deterministic split of virtual clients over pools by ``share`` (contiguous blocks)."""
    shares = np.array([p.share for p in pools], dtype=np.float64)
    counts = np.floor(shares / shares.sum() * num_clients).astype(int)
    counts[: num_clients - counts.sum()] += 1
    return [p.name for p, c in zip(pools, counts, strict=True) for _ in range(c)]


def partition_dataset(cfg: ExperimentConfig, dataset: Dataset) -> list[np.ndarray]:
    """Per-client training indices; every client must get at least one sample."""
    partitioner = make_partitioner(
        cfg.data.partitioner, cfg.data.num_clients, seed=cfg.seed, **cfg.data.partition_options
    )
    partitions = partitioner.partition(dataset.y_train, dataset.groups)
    empty = [i for i, p in enumerate(partitions) if len(p) == 0]
    if empty:
        raise ValueError(
            f"data.partitioner {cfg.data.partitioner!r} left clients {empty[:10]} without samples; "
            f"lower data.num_clients or change data.partition_options"
        )
    return partitions


def build_workload(cfg: ExperimentConfig, dataset: Dataset | None = None) -> Workload:
    """Load (or take) the dataset, partition it, and build the initial model from ``cfg.seed``."""
    dataset = dataset if dataset is not None else load_dataset(cfg.data.dataset, **cfg.data.options)
    partitions = partition_dataset(cfg, dataset)
    torch.manual_seed(cfg.seed)
    model = model_factory(cfg, dataset.num_classes, dataset.input_shape)()
    return Workload(
        dataset=dataset,
        partitions=partitions,
        pool_of_client=assign_pools(len(partitions), cfg.cluster.pools),
        init_params=get_params(model),
        init_buffers=get_buffers(model),
        layout=layout_of(model),
    )
