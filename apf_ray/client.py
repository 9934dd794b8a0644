"""The client side of a round: a host that trains many virtual clients with one model instance.

The same :class:`ClientHost` runs in this process (the in-process backend) and inside each
Ray client actor, so both give the same uploads for the same seed.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from apf_ray.aggregation import Partial
from apf_ray.client_store import HostStates, StoredState
from apf_ray.config import ExperimentConfig
from apf_ray.edge import aggregate_at_edge
from apf_ray.faults import client_fails, corrupt_rng, corrupt_upload
from apf_ray.flat import layout_of
from apf_ray.records import Broadcast, ClientResult
from apf_ray.strategies import Strategy, make_strategy
from apf_ray.training import TrainSettings, train_local
from apf_ray.workload import client_seed, model_factory


class ClientHost:
    """Trains virtual clients one after another.

    Per-client state is only what a strategy needs between rounds (error-feedback residuals,
    a partial-sync client's local values); APF clients are stateless. The round engine
    (:mod:`apf_ray.engine`) owns each client's record of it; the host reads and writes the
    state itself in the run's store (:mod:`apf_ray.client_store`), keeping the last ones it
    wrote in memory (``cluster.client_state_cache_mb``).
    """

    def __init__(self, cfg: ExperimentConfig, x_train: np.ndarray, y_train: np.ndarray, num_classes: int,
                 input_shape: tuple[int, ...], device: str = "cpu") -> None:
        self.cfg = cfg
        self.x_train, self.y_train = x_train, y_train
        self.device = device
        torch.manual_seed(cfg.seed)
        self.model = model_factory(cfg, num_classes, tuple(input_shape))()
        self.strategy: Strategy = make_strategy(cfg.strategy.name, cfg.strategy.options, cfg.strategy.uplink,
                                                cfg.seed)
        self.strategy.setup_client(layout_of(self.model).num_params)
        self.settings = TrainSettings(
            local_steps=cfg.train.local_steps,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay,
        )
        self.partitions: dict[int, np.ndarray] = {}
        self.states = HostStates(cfg.cluster.client_state_cache_mb)

    def add_clients(self, partitions: dict[int, np.ndarray]) -> int:
        """Host these clients (id → training indices); returns how many this host now has."""
        self.partitions.update({int(k): np.asarray(v, dtype=np.int64) for k, v in partitions.items()})
        return len(self.partitions)

    def train_one(self, broadcast: Broadcast, client_id: int, state: StoredState | dict | None = None) -> ClientResult:
        """Train one virtual client; any failure becomes an error result, never an exception.

        ``state`` is the client's strategy state from its previous round: its record in the
        run's store (``broadcast.client_store``), the state itself (shipped to a host that cannot
        see the store), or None before its first round (the strategy's ``new_client_state``).
        The result carries the updated state's record (written here) or, shipped, the state, so
        any host can train any client.
        """
        start = time.perf_counter()
        try:
            shipped = isinstance(state, dict)
            state = self.states.open(broadcast.client_store, client_id, state)
            if state is None:
                state = self.strategy.new_client_state(client_id)
            faults = self.cfg.faults
            if client_fails(self.cfg.seed, faults.client_failure_prob, broadcast.round, client_id):
                raise RuntimeError(f"injected failure (faults.client_failure_prob={faults.client_failure_prob})")
            idx = self.partitions[client_id]
            plan = broadcast.plan_for(client_id)
            seed = client_seed(self.cfg.seed, broadcast.round, client_id)
            torch.manual_seed(seed)
            local = train_local(
                self.model,
                self.x_train[idx],
                self.y_train[idx],
                params=self.strategy.start_params(plan, broadcast.params, state),
                buffers=broadcast.buffers,
                mask=plan.train_mask,
                settings=self.settings,
                seed=seed,
                device=self.device,
                gradient_term=self.strategy.gradient_term(plan, broadcast.params, state),
            )
            upload = self.strategy.encode_upload(
                plan, broadcast.params, local.params, local.buffers, local.num_samples, local.loss, state
            )
            corrupt = corrupt_rng(self.cfg.seed, faults.corrupt_upload_prob, broadcast.round, client_id)
            if corrupt is not None:
                upload = corrupt_upload(upload, faults.corrupt_kind, corrupt, faults.corrupt_scale)
            saved = self.states.close(broadcast.client_store, broadcast.round, client_id, shipped, state)
            return ClientResult(client_id, upload, local.compute_s, device=self.device, state=saved)
        except Exception as err:  # a failing client must never take the round down
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            return ClientResult(client_id, None, time.perf_counter() - start,
                                error=detail[: self.cfg.cluster.max_error_chars], device=self.device)

    def run(self, broadcast: Broadcast, calls: list[tuple[int, StoredState | dict | None]]) -> list[ClientResult]:
        """Train ``(client id, strategy state)`` in order; each updated state is in its result."""
        return [self.train_one(broadcast, cid, state) for cid, state in calls]

    def stream(self, broadcast: Broadcast, calls: Sequence[tuple[int, StoredState | dict | None]],
               stop: Callable[[], bool] = lambda: False) -> Iterator[ClientResult | Partial]:
        """Train ``calls`` in order, yielding each result as it finishes; once ``stop()`` is true, start no more.

        Under aggregation on the way in (``broadcast.edge_bounds``) this host is its group's
        edge aggregator (:func:`apf_ray.edge.aggregate_at_edge`): each result comes with its
        verdict instead of its upload, and the group's partial follows the last one.
        """
        def trained() -> Iterator[ClientResult]:
            for cid, state in calls:
                if stop():
                    return
                yield self.train_one(broadcast, cid, state)

        if broadcast.edge_bounds is None:
            return trained()
        sizes = {cid: len(self.partitions[cid]) for cid, _ in calls if cid in self.partitions}
        return aggregate_at_edge(self.strategy, self.cfg, broadcast, sizes, trained())
