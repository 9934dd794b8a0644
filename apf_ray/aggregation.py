"""Combining client vectors on the server."""

from __future__ import annotations

import numpy as np


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Sample-weighted mean of equally long float32 vectors, accumulated in float64, in order."""
    if not vectors:
        raise ValueError("nothing to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if (w <= 0).any():
        raise ValueError("aggregation weights must be positive")
    acc = np.zeros(vectors[0].shape, dtype=np.float64)
    for vec, wi in zip(vectors, w, strict=True):
        acc += wi * vec
    return (acc / w.sum()).astype(np.float32)
