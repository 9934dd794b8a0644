"""Aggregation on the way in: each group of clients sends the server one partial, not K uploads.

A server that decodes every upload of a round before aggregating holds K model-sized vectors
(ResNet-18: 45 MB each, ~90 GB at 1,000 clients per round). Under the default sample-weighted
mean the aggregate depends on the uploads only through their weighted sums, so every client
actor acts as an *edge aggregator* — trusted server code beside the clients: it decodes,
validates (:func:`judge`, the server's own checks with the bounds the server computed for the
round, ``Broadcast.edge_bounds``) and sums its own clients' uploads, in the order it trained
them, into one :class:`~apf_ray.aggregation.Partial`. Each client's result travels back as
its :class:`~apf_ray.records.UploadVerdict` (status, bytes, samples, loss: the same fields of
``clients.parquet`` as before); the partial is the only model-sized thing, one per actor.
The server merges the partials in a fixed order (pools in config order, actors in pool
order) and applies the strategy's :meth:`~apf_ray.strategies.Strategy.apply_partial`.

Groups are the pool layout (:func:`edge_groups`): actor ``i`` of a pool with ``n`` actors gets
every ``n``-th of the pool's clients. The in-process backend forms the same groups (``n`` =
``num_actors``; ``auto``: one group per pool), so for a given layout both backends sum in the
same order and agree bit for bit; other layouts sum in another order and agree to float64
rounding (then float32). Robust statistics (``defence.aggregation`` median / trimmed mean)
and strategies that read each upload (:meth:`Strategy.streams` False) keep every upload on the
server; :func:`check_round_memory` refuses such a run up front when a round cannot fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from apf_ray.aggregation import ROBUST_BLOCK, Partial
from apf_ray.config import ExperimentConfig
from apf_ray.errors import SetupError
from apf_ray.records import Broadcast, ClientResult, RoundPlan, UploadVerdict
from apf_ray.strategies import DecodedUpload, Strategy, strategy_class
from apf_ray.validation import UploadValidator

Call = TypeVar("Call", bound=tuple)

def judge(strategy: Strategy, validator: UploadValidator, plan: RoundPlan, res: ClientResult,
          params: np.ndarray, buffers: np.ndarray, bounds: tuple[float, float],
          max_error_chars: int) -> tuple[UploadVerdict, DecodedUpload | None]:
    """A client's result decoded and checked: its verdict, and its upload when it is valid.

    A malformed upload or one failing :meth:`UploadValidator.check` is ``rejected`` (its
    bytes still crossed the wire, so they count); a client that sent no values is ``skipped``
    with its metadata (CMFL: its relevance) as the reason. The same function runs on the
    server and at every edge, so where an upload is judged never changes its record.
    """
    if res.upload is None:
        return UploadVerdict("error", res.error or "unknown error"), None
    buf = res.upload
    nbytes = int(buf.nbytes) if isinstance(buf, np.ndarray) else 0
    reason = None
    try:
        up = strategy.decode_upload(plan, res.client_id, np.asarray(buf))
    except Exception as err:  # a malformed upload refuses the client, not the round
        up, reason = None, f"malformed upload: {err}"
    if reason is None:
        reason = validator.check(up, params, buffers, bounds)
    if reason is not None:
        return UploadVerdict("rejected", reason[:max_error_chars], bytes_up=nbytes), None
    verdict = UploadVerdict("ok", bytes_up=up.nbytes, num_samples=up.num_samples, train_loss=up.loss)
    if up.values is None:  # why, as the client said it (CMFL: its relevance) into clients.parquet
        verdict.status = "skipped"
        verdict.error = ", ".join(f"{k}={v:.4g}" for k, v in sorted(up.meta.items()) if k != "skipped")
    return verdict, up


def sum_upload(strategy: Strategy, partial: Partial, up: DecodedUpload) -> None:
    """Add a valid upload to ``partial``: its values (a skip has none) and the strategy's tally of it."""
    if up.values is not None:
        partial.add(up.values, up.sync_mask, up.buffers, up.num_samples)
    partial.tally(strategy.tally_upload(up))


def aggregate_at_edge(strategy: Strategy, cfg: ExperimentConfig, broadcast: Broadcast,
                      partition_sizes: Mapping[int, int],
                      results: Iterable[ClientResult]) -> Iterator[ClientResult | Partial]:
    """Judge each result as it comes and sum the valid ones; yields each result with its verdict
    (its upload dropped), then the group's partial (empty if nothing valid arrived).

    Only one decoded upload is alive at a time, so an edge's memory is its partial's.
    """
    validator = UploadValidator(cfg.defence, partition_sizes, broadcast.params.size, broadcast.buffers.size)
    partial = Partial()
    for res in results:
        verdict, up = judge(strategy, validator, broadcast.plan_for(res.client_id), res, broadcast.params,
                            broadcast.buffers, broadcast.edge_bounds, cfg.cluster.max_error_chars)
        if up is not None:
            sum_upload(strategy, partial, up)
        yield replace(res, upload=None, verdict=verdict)
    yield partial


def edge_groups(calls: Sequence[Call], pool_of_client: Sequence[str], pools: Sequence[str],
                actors: Mapping[str, int]) -> list[tuple[str, list[Call]]]:
    """A round's calls (``(client id, ...)`` in client order) as ``(pool, share)`` per actor, in order.

    Pools in ``pools`` order; actor ``i`` of a pool with ``actors[pool]`` actors gets every
    ``actors[pool]``-th of the pool's calls from the ``i``-th (shares differ by at most one;
    empty shares are left out). Both backends group by this, so their partials sum the same
    clients in the same order.
    """
    by_pool: dict[str, list[Call]] = {p: [] for p in pools}
    for call in calls:
        by_pool[pool_of_client[call[0]]].append(call)
    groups = []
    for pool, pool_calls in by_pool.items():
        n = max(1, actors.get(pool, 1))
        groups.extend((pool, share) for i in range(n) if (share := pool_calls[i::n]))
    return groups


def keeps_every_upload(cfg: ExperimentConfig) -> str | None:
    """Why a round of ``cfg`` keeps every decoded upload on the server, or None when it streams."""
    if cfg.defence.aggregation != "mean":
        return (f"defence.aggregation={cfg.defence.aggregation} is a coordinate-wise statistic of every upload, "
                "so the server keeps all of a round's uploads")
    if not strategy_class(cfg.strategy.name).streams():
        return (f"strategy {cfg.strategy.name} reads every upload itself (it overrides aggregate or "
                "observe_uploads), so the server keeps all of a round's uploads")
    return None


def available_memory_bytes() -> int:
    """Memory this machine can give a process now (Linux ``MemAvailable``; else free pages), bytes."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def upload_bytes_on_server(cfg: ExperimentConfig, num_params: int, num_buffers: int) -> int:
    """Bytes one upload takes on a server that keeps every upload of a round.

    Its wire buffer (at most the dense float32 update) and its decoded float32 values, and its
    buffers twice; a robust statistic also stacks and sorts a block of every upload's values.
    """
    per_upload = 2 * 4 * (num_params + num_buffers)
    if cfg.defence.aggregation != "mean":
        per_upload += 2 * 4 * min(num_params, ROBUST_BLOCK)
    return per_upload


def check_round_memory(cfg: ExperimentConfig, num_params: int, num_buffers: int,
                       available: int | None = None) -> None:
    """SetupError, before anything starts, when a round whose uploads all stay on the server cannot fit.

    Only such rounds are checked (:func:`keeps_every_upload`): a streamed round holds one
    partial per actor. ``available`` (bytes) defaults to ``cluster.server_memory_gb``, else
    what this machine has available now.
    """
    why = keeps_every_upload(cfg)
    if why is None:
        return
    if available is None:
        gb = cfg.cluster.server_memory_gb
        available = int(gb * 1e9) if gb is not None else available_memory_bytes()
    per_upload = upload_bytes_on_server(cfg, num_params, num_buffers)
    k = cfg.train.clients_per_round
    if k * per_upload <= available:
        return
    fit = math.floor(available / per_upload)
    fits = f"train.clients_per_round ≤ {fit} fits" if fit else "not even one upload fits"
    raise SetupError(f"{why}: {k} clients per round (train.clients_per_round) of a {num_params:,}-parameter "
                     f"model need ~{k * per_upload / 1e9:.3g} GB, and {available / 1e9:.3g} GB is available "
                     f"(cluster.server_memory_gb); {fits}")
