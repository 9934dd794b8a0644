"""What the server accepts from a client: checks between decoding an upload and aggregating it.

Clients are not trusted. One NaN, one 1e30 or one claimed sample count of 1e12 would
otherwise become the global model (FedAvg weights by the claim), and an upload that crashes
aggregation would end the run. Decoding (:meth:`Strategy.decode_upload`,
:meth:`UplinkChain.decode`) already refuses any structure the round's plan does not expect —
the wrong container kind or value type, the wrong number of values, unknown parts, truncated
or padded buffers. :class:`UploadValidator` then checks what a well-formed upload claims:

- the sample count is a whole number in [1, the client's partition size]: the server
  assigned the partitions, so it knows the most a client can have trained on;
- the loss and every value of the update and the buffers are finite;
- the update (the change over the synchronised scalars) has an L2 norm within
  ``defence.max_update_norm`` and ``defence.max_update_ratio`` × max(‖global‖₂, 1), and the
  change of the buffers (BatchNorm statistics) one within ``defence.max_buffer_ratio`` ×
  max(‖global buffers‖₂, √count).

A refused upload is recorded as ``rejected`` with the reason; it never reaches the model and
never ends the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from apf_ray.config import DefenceConfig
from apf_ray.strategies import DecodedUpload


def _l2(vec: np.ndarray) -> float:
    """L2 norm in float64, so float32 values near the top of their range do not overflow.

    ``einsum`` casts in small buffered chunks: one read of ``vec``, no model-sized float64
    copy. Not finite exactly when ``vec`` holds a NaN or an infinity (float32 squares summed
    in float64 cannot overflow), so it is the finiteness check too.
    """
    flat = np.ravel(vec)
    return math.sqrt(float(np.einsum("i,i->", flat, flat, dtype=np.float64)))


class UploadValidator:
    """Checks decoded uploads against what the server knows (partition sizes, the global model)."""

    def __init__(self, defence: DefenceConfig, partition_sizes: Mapping[int, int], num_params: int,
                 num_buffers: int) -> None:
        self.defence = defence
        self.partition_sizes = {int(c): int(n) for c, n in partition_sizes.items()}  # client id -> samples
        self.num_params = int(num_params)
        self.num_buffers = int(num_buffers)

    def norm_bound(self, params: np.ndarray) -> float:
        """The largest L2 norm accepted for an update of the global ``params`` this round."""
        bound = math.inf
        if self.defence.max_update_norm is not None:
            bound = self.defence.max_update_norm
        if self.defence.max_update_ratio is not None:
            bound = min(bound, self.defence.max_update_ratio * max(_l2(params), 1.0))
        return bound

    def buffer_bound(self, buffers: np.ndarray) -> float:
        """The largest L2 norm accepted for the change of the global ``buffers`` this round."""
        if self.defence.max_buffer_ratio is None:
            return math.inf
        return self.defence.max_buffer_ratio * max(_l2(buffers), math.sqrt(buffers.size), 1.0)

    def check(self, up: DecodedUpload, params: np.ndarray, buffers: np.ndarray,
              bounds: tuple[float, float] | None = None) -> str | None:
        """Why ``up`` must be refused, or None if it is acceptable.

        ``bounds`` are ``(norm_bound(params), buffer_bound(buffers))``, computed once per round
        by the caller (they are recomputed here when omitted).
        """
        limit = self.partition_sizes.get(up.client_id)
        if limit is None:
            return f"unknown client id {up.client_id}"
        n = up.num_samples
        if not (isinstance(n, (int, float, np.number)) and math.isfinite(n) and float(n).is_integer()
                and 1 <= n <= limit):
            return f"claims {n!r} samples; client {up.client_id} holds {limit}"
        if not math.isfinite(up.loss):
            return f"loss is {up.loss!r}"
        if up.buffers.shape != (self.num_buffers,):
            return f"buffers have shape {up.buffers.shape}, the model has {self.num_buffers}"
        if not np.all(np.isfinite(up.buffers)):
            return "buffers hold NaN or inf"
        if up.values is None:
            return None  # a skip (CMFL): nothing to aggregate beyond the claims checked above
        if up.sync_mask is not None and up.sync_mask.shape != (self.num_params,):
            return f"sync mask has shape {up.sync_mask.shape}, the model has {self.num_params} parameters"
        synced = self.num_params if up.sync_mask is None else int(np.count_nonzero(up.sync_mask))
        if up.values.shape != (synced,):
            return f"update has shape {up.values.shape}, the round synchronises {synced} parameters"
        norm = _l2(up.values)  # also the finiteness check: one pass over what was sent
        if not math.isfinite(norm):
            bad = int(np.count_nonzero(~np.isfinite(up.values)))
            return f"update holds {bad} NaN or inf value(s)"
        param_bound, buffer_bound = bounds if bounds is not None else (
            self.norm_bound(params), self.buffer_bound(buffers))
        if norm > param_bound:
            return f"update norm {norm:.4g} exceeds the bound {param_bound:.4g} (defence.max_update_norm/_ratio)"
        if self.num_buffers:
            change = _l2(up.buffers.astype(np.float64) - buffers)
            if change > buffer_bound:
                return f"buffers change by {change:.4g}, over the bound {buffer_bound:.4g} (defence.max_buffer_ratio)"
        return None
