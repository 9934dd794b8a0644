"""Combining client vectors on the server: the sample-weighted mean, and robust alternatives.

``mean`` is the sample-weighted mean of the strategies' default ``aggregate``. ``median`` and
``trimmed_mean`` (``defence.aggregation``, applied to any strategy by
:mod:`apf_ray.consensus`) are
coordinate-wise and unweighted (a client's sample count is its own claim), so a minority of
clients cannot move a coordinate further than the honest values around it — at some cost in
accuracy on non-IID data. They are computed over the round's synchronised positions only;
every other position gets exactly ``+0.0``, as under the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from apf_ray.masks import mask_index

ROBUST_BLOCK = 1 << 20
"""Positions per block of the robust statistics: k clients × 1 Mi positions × 4 B of scratch."""

_MEAN_BLOCK = 1 << 15
"""Positions per block of the weighted mean and of a partial's sums: float64 blocks (256 KiB
each) that stay in cache."""


def weighted_mean(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Sample-weighted mean of equally long float32 vectors, accumulated in float64, in order.

    Block by block, so each vector is read once and no model-sized float64 temporary is made:
    a round with K uploads costs about K passes over the model, not 4K plus 2K allocations.
    Every position still sums ``w_i · v_i`` in float64 in upload order, as one pass would.
    """
    if not vectors:
        raise ValueError("nothing to aggregate")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or (w <= 0).any():
        raise ValueError(f"aggregation weights must be finite and positive, got {w.tolist()[:10]}")
    n, total = vectors[0].size, w.sum()
    out = np.empty(vectors[0].shape, dtype=np.float32)
    acc, term = np.empty(min(n, _MEAN_BLOCK)), np.empty(min(n, _MEAN_BLOCK))
    for start in range(0, n, _MEAN_BLOCK):
        stop = min(start + _MEAN_BLOCK, n)
        a, t = acc[: stop - start], term[: stop - start]
        a.fill(0.0)
        for vec, wi in zip(vectors, w, strict=True):
            np.multiply(vec[start:stop], wi, out=t)
            a += t
        a /= total
        out[start:stop] = a
    return out


def _trimmed(block: np.ndarray, trim: int) -> np.ndarray:
    """Mean over axis 0 of ``block`` after dropping the ``trim`` lowest and highest values."""
    if trim == 0:
        return block.mean(axis=0, dtype=np.float64)
    part = np.sort(block, axis=0)
    return part[trim : block.shape[0] - trim].mean(axis=0, dtype=np.float64)


def coordinate_wise(vectors: Sequence[np.ndarray], method: str, trim_fraction: float = 0.0,
                    positions: np.ndarray | None = None) -> np.ndarray:
    """Coordinate-wise ``median`` or ``trimmed_mean`` of equally long float32 vectors.

    ``positions`` (bool, same length) restricts the statistic to those coordinates; the rest
    are 0. ``trimmed_mean`` cuts ⌊trim_fraction·k⌋ values at each end of every coordinate
    (at most (k−1)//2, so one value always remains).
    """
    if not vectors:
        raise ValueError("nothing to aggregate")
    if method not in ("median", "trimmed_mean"):
        raise ValueError(f"unknown coordinate-wise aggregation {method!r}; allowed: median, trimmed_mean")
    n, k = vectors[0].size, len(vectors)
    idx = np.arange(n) if positions is None else np.flatnonzero(positions)
    trim = min(int(np.floor(trim_fraction * k)), (k - 1) // 2)
    out = np.zeros(n, dtype=np.float32)
    for start in range(0, idx.size, ROBUST_BLOCK):
        sel = idx[start : start + ROBUST_BLOCK]
        block = np.stack([np.asarray(v, dtype=np.float32)[sel] for v in vectors])
        stat = np.median(block, axis=0) if method == "median" else _trimmed(block, trim)
        out[sel] = stat.astype(np.float32)
    return out


class Partial:
    """Sample-weighted sums of a group of uploads: an edge aggregator's one message to the server.

    ``sums`` holds Σ wᵢ·vᵢ in float64 over ``sync_mask``'s positions (compact; None: every
    scalar), ``buffer_sums`` Σ wᵢ·bᵢ, ``weight`` Σ wᵢ (samples). Uploads that synchronised
    different scalars (per-client plans) are summed over the union of their masks, an upload
    adding nothing where it sent nothing. Every sum starts from +0.0 and adds its terms in the
    order they come, as :func:`weighted_mean` does, so one partial of uploads in order, divided
    by its weight, equals their weighted mean bit for bit; partials of other groupings agree
    to float64 rounding. Memory: one float64 model-sized vector (the sums), whatever the group's size:
    an upload with the sums' mask is added a cache-sized block at a time.
    """

    def __init__(self) -> None:
        self.sums: np.ndarray | None = None
        self.sync_mask: np.ndarray | None = None
        self.buffer_sums: np.ndarray | None = None
        self.weight = 0.0
        self.count = 0  # uploads summed (with values)
        self.tallies: dict[str, np.ndarray] = {}  # integer counts of the strategy's (Strategy.tally_upload)

    @property
    def empty(self) -> bool:
        return self.count == 0

    def add(self, values: np.ndarray, sync_mask: np.ndarray | None, buffers: np.ndarray, weight: float) -> None:
        """Add one upload's compact float32 ``values`` over ``sync_mask``, weighted by ``weight`` samples."""
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"aggregation weights must be finite and positive, got {w}")
        scale = np.float64(w)  # float32 values times a float64: cast up exactly, multiplied in float64
        self._add(values, sync_mask, np.multiply(buffers, scale), scale, w, 1)

    def tally(self, counts: dict[str, np.ndarray]) -> None:
        """Add integer counts by name (exact, so in any order the same: GWPF's thaw votes)."""
        for name, value in counts.items():
            value = np.asarray(value, dtype=np.int64)
            self.tallies[name] = self.tallies[name] + value if name in self.tallies else value.copy()

    def merge(self, other: Partial) -> None:
        """Add another partial's sums and tallies (the server combining the edges' partials, in order)."""
        if not other.empty:  # its sums are weighted already: scaled by exactly 1
            self._add(other.sums, other.sync_mask, other.buffer_sums, np.float64(1.0), other.weight, other.count)
        self.tally(other.tallies)

    def _add(self, terms: np.ndarray, mask: np.ndarray | None, buffer_terms: np.ndarray, scale: np.float64,
             w: float, n: int) -> None:
        """Add ``terms × scale`` in float64 (over ``mask``) and float64 ``buffer_terms``.

        The first terms become the sums as ``terms × scale + 0.0``: the same bits as adding them
        onto zeros (-0.0 turns +0.0), without a zeroed model-sized vector. Later terms with the
        sums' mask are added in place, a block at a time, without a model-sized temporary.
        """
        if self.empty:
            self.sync_mask = None if mask is None else mask.copy()
            self.sums = np.multiply(terms, scale)
            self.sums += 0.0
            self.buffer_sums = buffer_terms + 0.0
        elif _same_mask(self.sync_mask, mask):
            _add_scaled(self.sums, terms, scale)
            self.buffer_sums += buffer_terms
        else:
            union = None if self.sync_mask is None or mask is None else self.sync_mask | mask
            self.sums = _spread(self.sums, self.sync_mask, union)
            self.sums += _spread(np.multiply(terms, scale), mask, union)
            self.sync_mask = union
            self.buffer_sums += buffer_terms
        self.weight += w
        self.count += n

    def mean(self) -> tuple[np.ndarray, np.ndarray]:
        """(float32 mean over ``sync_mask``'s positions, float32 mean buffers)."""
        if self.empty:
            raise ValueError("nothing to aggregate")
        return _divided(self.sums, self.weight), _divided(self.buffer_sums, self.weight)


def _add_scaled(sums: np.ndarray, values: np.ndarray, scale: np.float64) -> None:
    """``sums += values * scale`` in float64, a block at a time: the same bits as with a float64
    copy of ``values``, without that model-sized temporary (a fresh allocation per upload, which
    the kernel maps and zeroes: ~10 ms at ResNet-18, and sometimes a compaction stall)."""
    block = np.empty(min(values.size, _MEAN_BLOCK))
    for start in range(0, values.size, _MEAN_BLOCK):
        stop = min(start + _MEAN_BLOCK, values.size)
        term = block[: stop - start]
        np.multiply(values[start:stop], scale, out=term)
        sums[start:stop] += term


def _divided(sums: np.ndarray, weight: float) -> np.ndarray:
    """float32 ``sums / weight``, divided in float64 and rounded once, as ``(sums / weight).astype(
    np.float32)`` (the same bits) without its model-sized float64 temporary."""
    return np.divide(sums, weight, out=np.empty(sums.size, dtype=np.float32), casting="same_kind")


def _same_mask(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def _spread(compact: np.ndarray, mask: np.ndarray | None, union: np.ndarray | None) -> np.ndarray:
    """``compact`` (over ``mask``) laid out over ``union`` ⊇ ``mask``, +0.0 at the positions it lacks."""
    if mask is None:  # every scalar: the union is every scalar too
        return compact
    dense = np.zeros(mask.size)
    dense[mask_index(mask)] = compact
    return dense if union is None else dense[mask_index(union)]
