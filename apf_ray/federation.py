"""The round logic, free of Ray: server core, client host, and the in-process reference loop.

``ServerCore`` and ``ClientHost`` are the only places where a round happens. The in-process
loop (``run_inprocess``) wires them together directly; the Ray layer (``actors/``) hosts the
very same objects in actors, so both paths give the same global model for the same seed.

Versions: the global model after ``r`` aggregations is version ``r``. The server remembers,
per scalar, the version at which it last changed and which version each client holds, so the
downlink of a returning client is only what it lacks (SPEC §3).
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from apf_ray import codec
from apf_ray.config import ExperimentConfig, PoolConfig
from apf_ray.data import Dataset, load_dataset, make_partitioner
from apf_ray.flat import FlatLayout, get_buffers, get_params, layout_of, set_buffers, set_params
from apf_ray.models import build_model
from apf_ray.strategies import DecodedUpload, RoundPlan, Strategy, make_strategy
from apf_ray.training import TrainSettings, evaluate, train_local


@dataclass
class Broadcast:
    """Everything a round's clients need; put into the object store once per round."""

    round: int  # 1-based round being run; the model is version round-1
    params: np.ndarray
    buffers: np.ndarray
    plan: RoundPlan


@dataclass
class ClientResult:
    client_id: int
    upload: np.ndarray | None  # the wire buffer (uint8); None when the client failed
    compute_s: float = 0.0
    error: str | None = None
    device: str = "cpu"
    state: dict | None = None  # the client's strategy state after this round (residuals), if any


@dataclass
class ClientRecord:
    round: int
    client_id: int
    pool: str
    status: str  # ok | skipped | error | timeout | died
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0
    simulated_s: float = 0.0
    num_samples: int = 0
    train_loss: float = float("nan")
    device: str = ""  # where it trained (cpu / cuda)
    error: str = ""


@dataclass
class RoundRecord:
    round: int
    test_accuracy: float
    test_loss: float
    train_loss: float
    bytes_up: int
    bytes_down: int
    cum_bytes_up: int
    cum_bytes_down: int
    frozen_fraction: float
    threshold: float
    clients_sampled: int
    clients_reported: int
    clients_dropped: int
    wall_s: float
    simulated_s: float
    cum_simulated_s: float
    layer_frozen: dict[str, float] = field(default_factory=dict)


def client_seed(seed: int, round_idx: int, client_id: int) -> int:
    """Independent, reproducible stream per (experiment, round, client)."""
    return int(np.random.SeedSequence([seed, round_idx, client_id]).generate_state(1)[0])


def transfer_s(nbytes: int, mbps: float, latency_ms: float) -> float:
    return nbytes * 8 / (mbps * 1e6) + latency_ms / 1000.0


# ---------------------------------------------------------------------------------------
# Setup shared by every entry point: config → data/partitions → model → initial vector
# ---------------------------------------------------------------------------------------
@dataclass
class Workload:
    dataset: Dataset
    partitions: list[np.ndarray]  # per-client train indices
    client_pools: list[str]  # pool name of each client
    init_params: np.ndarray
    init_buffers: np.ndarray
    layout: FlatLayout


def model_factory(cfg: ExperimentConfig, dataset: Dataset) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        return build_model(
            cfg.model.name, num_classes=dataset.num_classes, input_shape=dataset.input_shape, **cfg.model.options
        )

    return make


def assign_pools(num_clients: int, pools: list[PoolConfig]) -> list[str]:
    """Deterministic split of virtual clients over pools by ``share`` (contiguous blocks)."""
    shares = np.array([p.share for p in pools], dtype=np.float64)
    counts = np.floor(shares / shares.sum() * num_clients).astype(int)
    counts[: num_clients - counts.sum()] += 1
    return [p.name for p, c in zip(pools, counts) for _ in range(c)]


def build_workload(cfg: ExperimentConfig) -> Workload:
    dataset = load_dataset(cfg.data.dataset, **cfg.data.options)
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
    torch.manual_seed(cfg.seed)
    model = model_factory(cfg, dataset)()
    return Workload(
        dataset=dataset,
        partitions=partitions,
        client_pools=assign_pools(len(partitions), cfg.cluster.pools),
        init_params=get_params(model),
        init_buffers=get_buffers(model),
        layout=layout_of(model),
    )


# ---------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------
class ClientHost:
    """Hosts many virtual clients: trains them one after another with one model instance.

    Per-client state is only what a strategy needs between rounds (error-feedback residuals,
    a partial-sync client's local values); APF clients are stateless. ``run`` keeps that state
    in this host; the Ray pools keep it on the server side and pass it with each call.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        x_train: np.ndarray,
        y_train: np.ndarray,
        num_classes: int,
        input_shape: tuple[int, ...],
        device: str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.x_train, self.y_train = x_train, y_train
        self.device = device
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model.name, num_classes=num_classes, input_shape=input_shape, **cfg.model.options)
        self.strategy: Strategy = make_strategy(cfg.strategy)
        self.settings = TrainSettings(
            local_steps=cfg.train.local_steps,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay,
        )
        self.partitions: dict[int, np.ndarray] = {}
        self.state: dict[int, dict] = {}

    def add_clients(self, partitions: dict[int, np.ndarray]) -> None:
        self.partitions.update({int(k): np.asarray(v, dtype=np.int64) for k, v in partitions.items()})

    def train_one(self, broadcast: Broadcast, client_id: int, state: dict | None = None) -> ClientResult:
        """Train one virtual client; any failure becomes an error result, never an exception.

        ``state`` is the client's strategy state from its previous round (empty for APF); the
        updated state comes back in the result, so any host can train any client.
        """
        start = time.perf_counter()
        state = dict(state or {})
        try:
            fault = self.cfg.faults.client_failure_prob
            if fault and np.random.default_rng(client_seed(self.cfg.seed + 1, broadcast.round, client_id)).random() < fault:
                raise RuntimeError(f"injected failure (faults.client_failure_prob={fault})")
            idx = self.partitions[client_id]
            plan = broadcast.plan
            seed = client_seed(self.cfg.seed, broadcast.round, client_id)
            torch.manual_seed(seed)
            start_params = self.strategy.start_params(plan, broadcast.params, state)
            local = train_local(
                self.model,
                self.x_train[idx],
                self.y_train[idx],
                params=start_params,
                buffers=broadcast.buffers,
                mask=plan.train_mask,
                settings=self.settings,
                seed=seed,
                device=self.device,
            )
            upload = self.strategy.encode_upload(
                plan, broadcast.params, local.params, local.buffers, local.num_samples, local.loss, state
            )
            return ClientResult(client_id, upload, local.compute_s, device=self.device, state=state or None)
        except Exception as err:  # noqa: BLE001 - a failing client must never take the round down
            detail = "".join(traceback.format_exception_only(type(err), err)).strip()
            return ClientResult(client_id, None, time.perf_counter() - start, error=detail, device=self.device)

    def run(self, broadcast: Broadcast, client_ids: list[int]) -> list[ClientResult]:
        """Train clients in order, keeping their strategy state here between rounds."""
        results = [self.train_one(broadcast, cid, self.state.get(cid)) for cid in client_ids]
        for res in results:
            if res.state is not None:
                self.state[res.client_id] = res.state
        return results


# ---------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------
class ServerCore:
    """Global model, strategy (APF controller), sampling, aggregation, accounting."""

    def __init__(self, cfg: ExperimentConfig, workload: Workload) -> None:
        self.cfg = cfg
        self.layout = workload.layout
        self.x_test, self.y_test = workload.dataset.x_test, workload.dataset.y_test
        self.client_pools = workload.client_pools
        self.networks = {p.name: p.network for p in cfg.cluster.pools}
        self.eval_model = model_factory(cfg, workload.dataset)()
        self.params = workload.init_params.copy()
        self.buffers = workload.init_buffers.copy()
        self.strategy = make_strategy(cfg.strategy)
        self.strategy.setup(self.params, cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.round = 0  # completed rounds = current model version
        self.last_changed = np.zeros(self.params.size, dtype=np.int32)
        self.mask_version = 0
        self.held_version: dict[int, int] = {}
        self.cum_up = self.cum_down = 0
        self.cum_sim = 0.0
        self.history: list[RoundRecord] = []
        self.client_history: list[ClientRecord] = []

    @property
    def num_params(self) -> int:
        return int(self.params.size)

    def _mask(self) -> np.ndarray:
        m = self.strategy.mask
        return np.ones(self.num_params, dtype=bool) if m is None else m

    # ---- a round ---------------------------------------------------------------------
    def begin_round(self) -> tuple[Broadcast, list[int]]:
        r = self.round + 1
        k = self.cfg.train.clients_per_round
        clients = sorted(int(c) for c in self.rng.choice(len(self.client_pools), size=k, replace=False))
        plan = self.strategy.plan(r)
        return Broadcast(r, self.params, self.buffers, plan), clients

    def downlink_payload(self, held: int | None, plan: RoundPlan) -> np.ndarray:
        """The real wire buffer a client holding version ``held`` receives."""
        mask = self._mask()
        if held is None:
            send_mask = None if mask.all() else mask
            changed = None
        else:
            send_mask = mask if self.mask_version > held else None
            changed = self.last_changed > held
        parts = {"model": codec.encode_downlink(self.params, changed=changed, mask=send_mask)}
        if self.buffers.size:
            parts["buffers"] = codec.encode_values(self.buffers, "float32")
        parts.update(plan.extras)
        return codec.encode_message(parts)

    def downlink_bytes(self, clients: list[int], plan: RoundPlan) -> dict[int, int]:
        """Bytes each client receives, encoding once per distinct held version."""
        by_version: dict[int | None, int] = {}
        out = {}
        for cid in clients:
            held = self.held_version.get(cid)
            if held not in by_version:
                by_version[held] = int(self.downlink_payload(held, plan).nbytes)
            out[cid] = by_version[held]
        return out

    def finish_round(
        self,
        broadcast: Broadcast,
        clients: list[int],
        results: list[ClientResult],
        missing: dict[int, str],
        down_bytes: dict[int, int] | None = None,
    ) -> RoundRecord:
        """Aggregate what arrived, run the controller, account bytes and time, evaluate.

        ``missing`` maps clients that never reported to why (timeout, actor died). The
        record's ``wall_s`` is left for the caller, who times the whole round.
        """
        r = broadcast.round
        plan = broadcast.plan
        down_bytes = down_bytes if down_bytes is not None else self.downlink_bytes(clients, plan)
        records: dict[int, ClientRecord] = {}
        uploads: list[DecodedUpload] = []
        for res in sorted(results, key=lambda x: x.client_id):
            rec = ClientRecord(r, res.client_id, self.client_pools[res.client_id], "ok",
                               bytes_down=down_bytes.get(res.client_id, 0), compute_s=res.compute_s,
                               device=res.device)
            records[res.client_id] = rec
            if res.upload is None:
                rec.status, rec.error = "error", res.error or "unknown error"
                continue
            try:
                up = self.strategy.decode_upload(plan, res.client_id, np.asarray(res.upload), self.num_params)
            except Exception as err:  # noqa: BLE001 - a corrupt upload drops the client, not the round
                rec.status, rec.error = "error", f"bad upload: {err}"
                continue
            rec.bytes_up, rec.num_samples, rec.train_loss = up.nbytes, up.num_samples, up.loss
            if up.update is None:
                rec.status = "skipped"
            uploads.append(up)
        for cid, reason in missing.items():
            records[cid] = ClientRecord(r, cid, self.client_pools[cid], reason,
                                        bytes_down=down_bytes.get(cid, 0), error=reason)
        aggregated = len(uploads) >= self.cfg.quorum()  # a CMFL skip counts as reporting
        old = self.params
        if aggregated:
            self.params, self.buffers = self.strategy.aggregate(self.params, self.buffers, uploads)
            self.last_changed[self.params != old] = r
            for u in uploads:
                self.held_version[u.client_id] = r - 1
        old_mask = self._mask().copy()
        self.strategy.observe(self.params)
        if not np.array_equal(old_mask, self._mask()):
            self.mask_version = r
        self.round = r
        for rec in records.values():
            net = self.networks[rec.pool]
            if rec.status in ("ok", "skipped"):
                rec.simulated_s = (transfer_s(rec.bytes_down, net.down_mbps, net.latency_ms) + rec.compute_s
                                   + transfer_s(rec.bytes_up, net.up_mbps, net.latency_ms))
        return self._record_round(r, clients, records, aggregated)

    def _record_round(self, r: int, clients: list[int], records: dict[int, ClientRecord],
                      aggregated: bool) -> RoundRecord:
        recs = list(records.values())
        ok = [c for c in recs if c.status in ("ok", "skipped")]
        up = sum(c.bytes_up for c in recs)
        down = sum(c.bytes_down for c in recs)
        sim = max((c.simulated_s for c in ok), default=0.0)
        self.cum_up += up
        self.cum_down += down
        self.cum_sim += sim
        acc = loss = float("nan")
        if r % self.cfg.train.eval_every == 0 or r == self.cfg.train.rounds:
            acc, loss = self.evaluate()
        weights = np.array([c.num_samples for c in ok], dtype=np.float64)
        losses = np.array([c.train_loss for c in ok], dtype=np.float64)
        train_loss = float((weights * losses).sum() / weights.sum()) if weights.sum() > 0 else float("nan")
        mask = self._mask()
        rec = RoundRecord(
            round=r,
            test_accuracy=acc,
            test_loss=loss,
            train_loss=train_loss,
            bytes_up=up,
            bytes_down=down,
            cum_bytes_up=self.cum_up,
            cum_bytes_down=self.cum_down,
            frozen_fraction=float(1.0 - mask.mean()),
            threshold=float(self.strategy.threshold) if self.strategy.threshold is not None else float("nan"),
            clients_sampled=len(clients),
            clients_reported=len(ok) if aggregated else 0,
            clients_dropped=len(clients) - (len(ok) if aggregated else 0),
            wall_s=0.0,
            simulated_s=sim,
            cum_simulated_s=self.cum_sim,
            layer_frozen={name: float(1.0 - mask[sl].mean()) for name, sl in self.layout.layer_slices().items()},
        )
        self.history.append(rec)
        self.client_history.extend(sorted(recs, key=lambda c: c.client_id))
        return rec

    def evaluate(self) -> tuple[float, float]:
        set_params(self.eval_model, self.params)
        set_buffers(self.eval_model, self.buffers)
        return evaluate(self.eval_model, self.x_test, self.y_test, batch_size=self.cfg.train.eval_batch_size)

    # ---- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "params": self.params.copy(),
            "buffers": self.buffers.copy(),
            "strategy": self.strategy.state_dict(),
            "rng": self.rng.bit_generator.state,
            "last_changed": self.last_changed.copy(),
            "mask_version": self.mask_version,
            "held_version": dict(self.held_version),
            "cum": (self.cum_up, self.cum_down, self.cum_sim),
            "history": [asdict(h) for h in self.history],
            "client_history": [asdict(c) for c in self.client_history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["params"].shape != self.params.shape:
            raise ValueError(
                f"checkpoint holds {state['params'].size} parameters, the configured model has {self.params.size}"
            )
        self.round = int(state["round"])
        self.params = np.array(state["params"], dtype=np.float32)
        self.buffers = np.array(state["buffers"], dtype=np.float32)
        self.strategy.load_state_dict(state["strategy"])
        self.rng.bit_generator.state = state["rng"]
        self.last_changed = np.array(state["last_changed"], dtype=np.int32)
        self.mask_version = int(state["mask_version"])
        self.held_version = {int(k): int(v) for k, v in state["held_version"].items()}
        self.cum_up, self.cum_down, self.cum_sim = state["cum"]
        self.history = [RoundRecord(**h) for h in state["history"]]
        self.client_history = [ClientRecord(**c) for c in state["client_history"]]
