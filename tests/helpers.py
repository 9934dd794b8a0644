"""Small configs shared by the integration tests (real data, real training, a few rounds)."""

from __future__ import annotations

from apf_ray.config import ExperimentConfig, build_config


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
        "strategy": {"name": "apf", "apf": {"threshold": 0.5, "alpha": 0.5}},
        "cluster": {"pools": [{"name": "cpu", "num_actors": 2, "num_cpus": 0.5}], "round_timeout_s": 120},
        "output": {"checkpoint_every": 2, "tensorboard": True, "plots": False},
    }
    return build_config(raw, list(overrides))
