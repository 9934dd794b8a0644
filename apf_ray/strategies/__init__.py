"""Strategies: what the server sends, what a client uploads, how uploads are aggregated.

Importing this package registers the built-ins: ``fedavg``, ``apf``, the strawmen
``partial_sync`` and ``permanent``, ``cmfl``, ``fedprox`` (a client-side proximal term) and
``gwpf`` (APF's rival: freezing from an EMA of update significance, thawing by client votes).
Top-k and Gaia are uplink sparsifiers (:mod:`apf_ray.compression`) that compose with any of them.
"""

from __future__ import annotations

from apf_ray.strategies import apf, cmfl, fedavg, fedprox, gwpf, strawmen
from apf_ray.strategies.base import (
    STRATEGIES,
    DecodedUpload,
    Strategy,
    frame_upload,
    register_strategy,
    strategy_class,
)
from apf_ray.uplink import UplinkChain

__all__ = [
    "STRATEGIES",
    "DecodedUpload",
    "Strategy",
    "apf",
    "cmfl",
    "fedavg",
    "fedprox",
    "frame_upload",
    "gwpf",
    "make_strategy",
    "register_strategy",
    "strategy_class",
    "strawmen",
]


def make_strategy(name: str, options: dict, uplink: list, seed: int = 0) -> Strategy:
    """Build the configured strategy (``cfg.strategy``'s fields; ``seed`` for its RNGs)."""
    cls = strategy_class(name)
    return cls(cls.Options.model_validate(options), UplinkChain.from_spec(uplink), seed)
