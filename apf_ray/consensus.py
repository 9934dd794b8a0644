"""Robust aggregation as a filter in front of any strategy's ``aggregate``.

``defence.aggregation: median | trimmed_mean`` must hold whatever the strategy does with its
uploads — a plug-in that overrides ``aggregate`` included. So the server does not hand the
strategy a robust combiner it could ignore; it reduces the round's valid uploads to ONE
consensus upload first: the coordinate-wise statistic of the synchronised values and of the
buffers, carrying the total sample count (its weight) and the sample-weighted mean loss.
Whatever the strategy then computes from its uploads (a mean, a median, a scaled step) it
computes from the robust statistic. The mean of one upload is that upload exactly (float64
``v·w/w == v``), so the built-in strategies aggregate the statistic bit for bit as before.

``mean`` (the default) passes the uploads through untouched: the strategy's own aggregate
(the sample-weighted mean) is the plain path. Skipped uploads (no values) pass through too,
so a strategy still sees who reported. Per-client side data (GWPF's votes, metadata) is not
combined here; strategies count it per upload in ``tally_upload`` or read it in ``observe_uploads``.
"""

from __future__ import annotations

from apf_ray.aggregation import coordinate_wise
from apf_ray.config import DefenceConfig
from apf_ray.masks import mask_index
from apf_ray.strategies.base import DecodedUpload, same_sync_mask, union_mask

CONSENSUS_ID = -1
"""``client_id`` of the consensus upload: it is no client's."""


class RobustConsensus:
    """``defence.aggregation`` as an upload filter: ``uploads -> uploads`` before ``aggregate``."""

    def __init__(self, defence: DefenceConfig) -> None:
        self.method = defence.aggregation
        self.trim_fraction = defence.trim_fraction

    def __call__(self, uploads: list[DecodedUpload]) -> list[DecodedUpload]:
        """The uploads ``aggregate`` sees: unchanged under ``mean``; else the consensus and the skips."""
        used = [u for u in uploads if u.values is not None]
        if self.method == "mean" or not used:
            return uploads
        if same_sync_mask(used):
            mask = used[0].sync_mask
            values = coordinate_wise([u.values for u in used], self.method, self.trim_fraction)
        else:  # per-client plans synchronised different scalars: the statistic over their union
            mask = union_mask(used)
            dense = coordinate_wise([u.update for u in used], self.method, self.trim_fraction, mask)
            values = dense if mask is None else dense[mask_index(mask)]
        buffers = coordinate_wise([u.buffers for u in used], self.method, self.trim_fraction)
        samples = sum(u.num_samples for u in used)
        loss = float(sum(u.loss * u.num_samples for u in used) / samples)
        consensus = DecodedUpload(CONSENSUS_ID, values, buffers, samples, loss, nbytes=0, sync_mask=mask)
        return [consensus, *(u for u in uploads if u.values is None)]
