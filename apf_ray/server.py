"""The server side of a round: global model, strategy, sampling, aggregation, accounting.

:class:`ServerCore` is the only place a round's server work happens; how client work runs
is passed in as an :data:`Executor` (in this process, or on Ray client pools), so every
backend gives the same global model for the same seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from apf_ray.aggregation import Partial
from apf_ray.config import ExperimentConfig
from apf_ray.consensus import RobustConsensus
from apf_ray.downlink import DownlinkTracker
from apf_ray.edge import judge, keeps_every_upload, sum_upload
from apf_ray.flat import set_buffers, set_params
from apf_ray.network import NetworkModel
from apf_ray.records import FAILED, REPORTED, Broadcast, ClientRecord, ClientResult, RoundEvent, RoundRecord
from apf_ray.strategies import DecodedUpload, make_strategy
from apf_ray.training import evaluate
from apf_ray.validation import UploadValidator
from apf_ray.workload import Workload, model_factory, sampling_rng

Executor = Callable[[Broadcast, list[int]], tuple[list[ClientResult], dict[int, str], list[Partial]]]
"""Runs a round's clients: ``(broadcast, client ids) -> (results, missing: id -> status, partials)``;
the partials (aggregation on the way in, :mod:`apf_ray.edge`) in their groups' order."""


def check_param_count(params: np.ndarray, expected: int) -> None:
    """ValueError if a saved parameter vector does not have the configured model's ``expected`` scalars."""
    if params.shape != (expected,):
        raise ValueError(f"checkpoint holds {params.size} parameters, the configured model has {expected}")


class PhaseTimer:
    """Seconds per phase of one round (``records.PHASES``), summed when a phase recurs.

    Part of every round's record, so a slow server shows where its time went in any run, not
    only under a profiler; two ``perf_counter`` calls per phase cost nothing next to a round.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


class ServerCore:
    """Owns the global model and everything the server counts; checkpointable."""

    def __init__(self, cfg: ExperimentConfig, workload: Workload) -> None:
        self.cfg = cfg
        self.layout = workload.layout
        self.x_test, self.y_test = workload.dataset.x_test, workload.dataset.y_test
        self.pool_of_client = workload.pool_of_client
        self.network = NetworkModel({p.name: p.network for p in cfg.cluster.pools})
        self.eval_model = model_factory(cfg, workload.dataset.num_classes, workload.dataset.input_shape)()
        self.params = workload.init_params.copy()
        self.buffers = workload.init_buffers.copy()
        self.strategy = make_strategy(cfg.strategy.name, cfg.strategy.options, cfg.strategy.uplink, cfg.seed)
        self.strategy.setup(self.params)
        self.consensus = RobustConsensus(cfg.defence)
        self.validator = UploadValidator(cfg.defence, {c: len(p) for c, p in enumerate(workload.partitions)},
                                         self.params.size, self.buffers.size)
        self.streams = keeps_every_upload(cfg) is None  # aggregation on the way in (apf_ray.edge)
        self.rng = sampling_rng(cfg.seed)
        self.downlink = DownlinkTracker(self.params.size)
        self.round = 0  # completed rounds = current model version
        self.cum_up = self.cum_down = 0
        self.cum_sim = 0.0

    @property
    def num_params(self) -> int:
        return int(self.params.size)

    @property
    def done(self) -> bool:
        return self.round >= self.cfg.train.rounds

    def active_mask(self) -> np.ndarray:
        """Full boolean mask of the scalars synchronised next round."""
        mask = self.strategy.sync_mask
        return np.ones(self.num_params, dtype=bool) if mask is None else mask.copy()

    # ---- a round -------------------------------------------------------------------------
    def begin_round(self) -> tuple[Broadcast, list[int]]:
        """The round's broadcast and clients: the strategy selects them and plans for each."""
        r = self.round + 1
        clients = self.strategy.select_clients(self.rng, len(self.pool_of_client), self.cfg.train.clients_per_round)
        plan = self.strategy.plan(r)
        own = {c: p for c in clients if (p := self.strategy.client_plan(plan, c)) is not None}
        return Broadcast(r, self.params, self.buffers, plan, own,
                         edge_bounds=self._bounds() if self.streams else None), clients

    def _bounds(self) -> tuple[float, float]:
        """This round's validation bounds (update norm, buffer change), from the global model."""
        return self.validator.norm_bound(self.params), self.validator.buffer_bound(self.buffers)

    def downlink_bytes(self, broadcast: Broadcast, clients: list[int]) -> dict[int, int]:
        """Bytes each sampled client receives this round (real encoded payloads), its plan's extras included."""
        shared = [c for c in clients if c not in broadcast.client_plans]
        down = self.downlink.bytes_for(shared, self.params, self.buffers, self.strategy.sync_mask,
                                       broadcast.plan.extras)
        for cid, plan in broadcast.client_plans.items():
            down.update(self.downlink.bytes_for([cid], self.params, self.buffers, self.strategy.sync_mask,
                                                plan.extras))
        return down

    def run_round(self, execute: Executor) -> RoundEvent:
        """Sample, execute, aggregate, account and evaluate one round, timing each phase."""
        start = time.perf_counter()
        timer = PhaseTimer()
        with timer("sampling"):
            broadcast, clients = self.begin_round()
        with timer("downlink"):
            down = self.downlink_bytes(broadcast, clients)
        with timer("clients"):
            results, missing, partials = execute(broadcast, clients)
        record, client_records = self.finish_round(broadcast, clients, results, missing, down, timer, partials)
        record.wall_s = time.perf_counter() - start
        return RoundEvent(record, client_records)

    def finish_round(self, broadcast: Broadcast, clients: list[int], results: list[ClientResult],
                     missing: dict[int, str], down: dict[int, int],
                     timer: PhaseTimer | None = None,
                     partials: Sequence[Partial] = ()) -> tuple[RoundRecord, list[ClientRecord]]:
        """Validate and aggregate what arrived, run the strategy's observer, account, evaluate.

        ``missing`` maps clients that never reported to why (``timeout``, ``died``,
        ``no_actor``). Uploads that fail validation are ``rejected``; if fewer than the quorum
        of valid uploads arrived, or their aggregate is not finite, the model is kept and the
        valid uploads are ``discarded``. A round that aggregates on the way in
        (``broadcast.edge_bounds``) takes the edges' ``partials`` (in order) and the verdicts
        in their results; a result that still carries its upload is judged and summed here,
        after them, one at a time. Otherwise every valid upload is decoded here and kept for
        the robust consensus and the strategy's ``aggregate``. The record's ``wall_s`` is left
        to the caller, who times the round; ``timer`` (the caller's, or a new one) times this
        part's phases into the record's ``phase_s``.
        """
        timer = timer if timer is not None else PhaseTimer()
        r = broadcast.round
        records: dict[int, ClientRecord] = {}
        uploads: list[DecodedUpload] = []  # kept only when the round does not stream
        total = Partial()
        with timer("decode"):
            for partial in partials:
                total.merge(partial)
            # The edges' bounds when there were edges (a norm of the model: ~12 ms at ResNet-18).
            bounds = broadcast.edge_bounds if broadcast.edge_bounds is not None else self._bounds()
            sampled = set(clients)
            for res in sorted(results, key=lambda x: x.client_id):
                if res.client_id not in sampled:
                    continue  # not sampled this round (a confused host): nothing to record it under
                rec = ClientRecord(r, res.client_id, self.pool_of_client[res.client_id], "ok",
                                   bytes_down=down.get(res.client_id, 0), compute_s=res.compute_s,
                                   device=res.device)
                records[res.client_id] = rec
                verdict, up = res.verdict, None
                if verdict is None:
                    verdict, up = judge(self.strategy, self.validator, broadcast.plan_for(res.client_id), res,
                                        self.params, self.buffers, bounds, self.cfg.cluster.max_error_chars)
                rec.status, rec.error, rec.bytes_up = verdict.status, verdict.error, verdict.bytes_up
                rec.num_samples, rec.train_loss = verdict.num_samples, verdict.train_loss
                if up is not None and broadcast.edge_bounds is not None:
                    sum_upload(self.strategy, total, up)
                elif up is not None:
                    uploads.append(up)
                    total.tally(self.strategy.tally_upload(up))
        for cid, reason in missing.items():
            records[cid] = ClientRecord(r, cid, self.pool_of_client[cid], reason,
                                        bytes_down=0 if reason == "no_actor" else down.get(cid, 0), error=reason)
        valid = [rec for rec in records.values() if rec.status in ("ok", "skipped")]
        quorum = self.cfg.quorum()
        quorum_met = len(valid) >= quorum  # a CMFL skip counts as reporting
        with timer("downlink"):
            self.downlink.record_received([c for c, rec in records.items() if rec.status != "no_actor"], r - 1)
        aggregated, why_not = False, f"round missed its quorum ({len(valid)} valid of {quorum} needed)"
        if quorum_met:
            with timer("aggregation"):
                if broadcast.edge_bounds is not None:
                    params, buffers = self.strategy.apply_partial(self.params, self.buffers, total)
                else:
                    params, buffers = self.strategy.aggregate(self.params, self.buffers, self.consensus(uploads))
                finite = bool(np.all(np.isfinite(params)) and np.all(np.isfinite(buffers)))
            if finite:
                old = self.params
                self.params, self.buffers = params, buffers
                with timer("downlink"):
                    self.downlink.record_aggregation(old, self.params, r)
                aggregated = True
            else:
                why_not = "the aggregate was not finite; round discarded, model kept"
        if aggregated:
            # A round that did not move the model says nothing about stability: APF's controller
            # would read it as a zero-motion check and freeze scalars because of an attack.
            with timer("controller"):
                old_mask = self.active_mask()
                self.strategy.observe_uploads(uploads)  # none when streamed: the strategy reads none
                self.strategy.observe_tallies(total.tallies)
                self.strategy.observe(self.params)
                if not np.array_equal(old_mask, self.active_mask()):
                    self.downlink.record_mask_change(r)
        else:
            for rec in valid:
                rec.status, rec.error = "discarded", why_not
        self.round = r
        for rec in records.values():
            if rec.status in REPORTED or rec.status == "rejected":
                rec.simulated_s = self.network.client_round_s(rec.pool, rec.bytes_down, rec.compute_s, rec.bytes_up)
        client_records = sorted(records.values(), key=lambda c: c.client_id)
        acc = loss = None
        if r % self.cfg.train.eval_every == 0 or r == self.cfg.train.rounds:
            with timer("evaluation"):
                acc, loss = self.evaluate()
            loss = loss if math.isfinite(loss) else None  # a finite but huge model overflows the loss
        with timer("record"):
            record = self._record_round(r, clients, client_records, acc, loss)
        record.quorum_met, record.aggregated = quorum_met, aggregated
        record.phase_s = timer.seconds
        return record, client_records

    def _record_round(self, r: int, clients: list[int], recs: list[ClientRecord], acc: float | None,
                      loss: float | None) -> RoundRecord:
        valid = [c for c in recs if c.status in REPORTED]
        arrived = [c for c in recs if c.status in REPORTED or c.status == "rejected"]
        up = sum(c.bytes_up for c in recs)
        down = sum(c.bytes_down for c in recs)
        sim = max((c.simulated_s for c in arrived), default=0.0)
        self.cum_up += up
        self.cum_down += down
        self.cum_sim += sim
        weights = np.array([c.num_samples for c in valid], dtype=np.float64)
        losses = np.array([c.train_loss for c in valid], dtype=np.float64)
        train_loss = float((weights * losses).sum() / weights.sum()) if weights.sum() > 0 else None
        mask = self.active_mask()
        return RoundRecord(
            round=r,
            test_accuracy=acc,
            test_loss=loss,
            train_loss=train_loss,
            bytes_up=up,
            bytes_down=down,
            cum_bytes_up=self.cum_up,
            cum_bytes_down=self.cum_down,
            frozen_fraction=_frozen(mask),
            threshold=self.strategy.threshold,
            clients_sampled=len(clients),
            clients_reported=len(valid),
            clients_dropped=sum(c.status in FAILED for c in recs),
            wall_s=0.0,
            simulated_s=sim,
            cum_simulated_s=self.cum_sim,
            layer_frozen={name: _frozen(mask[sl]) for name, sl in self.layout.layer_slices().items()},
            clients_rejected=sum(c.status == "rejected" for c in recs),
            clients_discarded=sum(c.status == "discarded" for c in recs),
        )

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the global model on the test set."""
        set_params(self.eval_model, self.params)
        set_buffers(self.eval_model, self.buffers)
        return evaluate(self.eval_model, self.x_test, self.y_test, batch_size=self.cfg.train.eval_batch_size)

    # ---- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything that evolves, as numpy arrays and JSON scalars with str keys.

        The arrays are the live ones, not copies (as torch's ``Module.state_dict()``): valid until
        the next round changes them. A caller that keeps them longer copies them, as the
        background checkpoint writer does (``copy=True``); why: each copy here would be a second,
        freshly allocated one per checkpoint, model-sized, on top of the writer's.
        """
        return {
            "round": self.round,
            "params": self.params,
            "buffers": self.buffers,
            "strategy": self.strategy.state_dict(),
            "rng": self.rng.bit_generator.state,
            "downlink": self.downlink.state_dict(),
            "cum_bytes_up": self.cum_up,
            "cum_bytes_down": self.cum_down,
            "cum_simulated_s": self.cum_sim,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = np.asarray(state["params"], dtype=np.float32)
        check_param_count(params, self.params.size)
        self.round = int(state["round"])
        self.params = params.copy()
        self.buffers = np.array(state["buffers"], dtype=np.float32)
        self.strategy.load_state_dict(state["strategy"])
        self.rng.bit_generator.state = state["rng"]
        self.downlink.load_state_dict(state["downlink"])
        self.cum_up, self.cum_down = int(state["cum_bytes_up"]), int(state["cum_bytes_down"])
        self.cum_sim = float(state["cum_simulated_s"])


def _frozen(active: np.ndarray) -> float:
    """Fraction of False in a boolean mask: ``1 - active.mean()`` to the bit (a count of True is
    exact in float64), by a count rather than a float64 sum (~1 ms against ~10 ms at ResNet-18)."""
    return float(1.0 - np.count_nonzero(active) / active.size)
