"""The Ray-free round logic: training with a mask, accounting, strategies, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from apf_ray import codec
from apf_ray.federation import ClientHost, ServerCore, build_workload
from apf_ray.models import build_model
from apf_ray.run import load_checkpoint, run_inprocess
from apf_ray.training import TrainSettings, train_local
from apf_ray.flat import get_params
from tests.helpers import tiny_config


# alpha=0.5, T=0.95: any scalar whose update changes sign once is judged stable from check 2.
FREEZE_FAST = ("strategy.apf.threshold=0.95", "strategy.apf.alpha=0.5")


@pytest.fixture(scope="module")
def workload():
    return build_workload(tiny_config())


def _host(cfg, wl):
    ds = wl.dataset
    host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
    host.add_clients(dict(enumerate(wl.partitions)))
    return host


def test_frozen_scalars_stay_bit_identical_through_sgd_with_momentum_and_weight_decay(workload):
    ds = workload.dataset
    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, input_shape=ds.input_shape)
    params = get_params(model)
    rng = np.random.default_rng(1)
    mask = rng.random(params.size) < 0.5
    params[~mask][:5] = [0.0, -0.0, 1e-30, -3.5, 7.0]
    settings = TrainSettings(local_steps=5, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.01)
    out = train_local(model, ds.x_train[:64], ds.y_train[:64], params=params, buffers=np.zeros(0, np.float32),
                      mask=mask, settings=settings, seed=3)
    assert out.params[~mask].tobytes() == params[~mask].tobytes()
    assert (out.params[mask] != params[mask]).mean() > 0.5  # the active ones did train


def test_apf_upload_carries_exactly_the_active_scalars(workload):
    cfg = tiny_config(*FREEZE_FAST)
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    sizes = []
    for _ in range(3):
        b, clients = server.begin_round()
        res = host.run(b, clients)
        active = server.num_params if b.plan.mask is None else int(b.plan.mask.sum())
        sizes.append((active, {r.upload.nbytes for r in res}))
        server.finish_round(b, clients, res, {})
    (a0, s0), *rest = sizes
    assert len(s0) == 1
    frozen_rounds = [(a, s) for a, s in rest if a < a0]
    assert frozen_rounds, "alpha=0, T=0.9 must freeze scalars after the first check"
    for a, s in frozen_rounds:
        assert s == {next(iter(s0)) - 4 * (a0 - a)}  # 4 float32 bytes per frozen scalar fewer


def test_global_frozen_values_never_move_and_match_the_clients(workload):
    cfg = tiny_config(*FREEZE_FAST)
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    for _ in range(2):
        b, clients = server.begin_round()
        server.finish_round(b, clients, host.run(b, clients), {})
    b, clients = server.begin_round()
    frozen = ~b.plan.mask
    assert frozen.any()
    before = server.params.copy()
    res = host.run(b, clients)
    for r in res:  # the client's trained model at frozen positions equals the server's
        local = before + server.strategy.decode_upload(b.plan, r.client_id, r.upload, server.num_params).update
        assert local[frozen].tobytes() == before[frozen].tobytes()
    server.finish_round(b, clients, res, {})
    assert server.params[frozen].tobytes() == before[frozen].tobytes()


def test_returning_client_downlink_is_a_delta_that_reconstructs_the_model(workload):
    cfg = tiny_config(*FREEZE_FAST, "train.clients_per_round=6")
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    for _ in range(2):
        b, clients = server.begin_round()
        server.finish_round(b, clients, host.run(b, clients), {})
    held_params, held_mask = server.params.copy(), server._mask().copy()
    assert not held_mask.all()
    b, clients = server.begin_round()
    server.finish_round(b, clients, host.run(b, clients), {})
    payload = server.downlink_payload(2, server.strategy.plan(4))
    full = server.downlink_payload(None, server.strategy.plan(4))
    assert payload.nbytes < full.nbytes
    parts = codec.decode_message(payload)
    params, mask = codec.decode_downlink(parts["model"], held_params, held_mask)
    assert params.tobytes() == server.params.tobytes()
    assert np.array_equal(mask, server._mask())


def test_run_writes_summary_tables_and_checkpoint(tmp_path):
    summary = run_inprocess(tiny_config(rounds=3), tmp_path)
    data = json.loads((tmp_path / "summary.json").read_text())
    for key in ("final_accuracy", "best_accuracy", "rounds", "bytes_up", "bytes_down", "wall_time_s",
                "simulated_time_s", "frozen_fraction_final", "config"):
        assert key in data
    assert data["rounds"] == 3 and summary["bytes_up"] > 0
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "rounds.parquet").num_rows == 3
    clients = pq.read_table(tmp_path / "clients.parquet").to_pylist()
    assert len(clients) == 9 and {c["device"] for c in clients} == {"cpu"}
    board = EventAccumulator(str(tmp_path / "tensorboard"))
    board.Reload()
    for tag in ("accuracy/test", "bytes/up", "bytes/down_cumulative", "apf/frozen_fraction", "apf/threshold",
                "clients/reporting", "time/simulated_s", "frozen_by_layer/features.0"):
        assert [e.step for e in board.Scalars(tag)] == [1, 2, 3], tag


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(tmp_path):
    cfg = tiny_config("output.checkpoint_every=2", rounds=5)
    run_inprocess(cfg, tmp_path / "full")
    _, full = load_checkpoint(tmp_path / "full")
    run_inprocess(cfg, tmp_path / "crash", stop_after=3)  # dies after round 3; last checkpoint: round 2
    cfg2, state = load_checkpoint(tmp_path / "crash")
    assert state["round"] == 2
    run_inprocess(cfg2, tmp_path / "crash", resume_state=state)
    _, resumed = load_checkpoint(tmp_path / "crash")
    assert resumed["params"].tobytes() == full["params"].tobytes()
    assert [h["round"] for h in resumed["history"]] == [1, 2, 3, 4, 5]
    assert [h["bytes_up"] for h in resumed["history"]] == [h["bytes_up"] for h in full["history"]]
    board = EventAccumulator(str(tmp_path / "crash" / "tensorboard"))
    board.Reload()  # round 3, written before the crash and again after resume, appears once
    assert [e.step for e in board.Scalars("bytes/up")] == [1, 2, 3, 4, 5]


def test_failing_clients_are_dropped_and_the_round_completes(tmp_path):
    cfg = tiny_config("faults.client_failure_prob=0.4", "cluster.min_clients=1", rounds=4)
    summary = run_inprocess(cfg, tmp_path)
    _, state = load_checkpoint(tmp_path)
    errors = [c for c in state["client_history"] if c["status"] == "error"]
    assert errors and all("injected failure" in c["error"] for c in errors)
    assert summary["clients_dropped"] == len(errors)
    assert summary["rounds"] == 4


def test_round_below_quorum_leaves_the_model_unchanged(workload):
    cfg = tiny_config("cluster.min_clients=3")
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    b, clients = server.begin_round()
    res = host.run(b, clients)[:2]
    before = server.params.copy()
    rec = server.finish_round(b, clients, res, {clients[2]: "timeout"})
    assert server.params.tobytes() == before.tobytes()
    assert rec.clients_reported == 0 and rec.clients_dropped == 3


@pytest.mark.parametrize("name", ["fedavg", "topk", "gaia", "cmfl", "partial_sync", "permanent"])
def test_every_strategy_trains_and_counts_bytes(tmp_path, name):
    summary = run_inprocess(tiny_config(f"strategy.name={name}", rounds=3), tmp_path)
    assert summary["rounds"] == 3 and summary["bytes_up"] > 0
    assert summary["final_accuracy"] is not None


def test_topk_uploads_fewer_bytes_than_fedavg(tmp_path):
    fed = run_inprocess(tiny_config("strategy.name=fedavg", rounds=2), tmp_path / "f")
    top = run_inprocess(tiny_config("strategy.name=topk", "strategy.topk.ratio=0.05", rounds=2), tmp_path / "t")
    assert top["bytes_up"] < 0.1 * fed["bytes_up"]


def test_partial_sync_clients_drift_apart_at_unsynchronised_positions(workload):
    cfg = tiny_config("strategy.name=partial_sync", *FREEZE_FAST,
                      "train.clients_per_round=6")
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    for _ in range(3):
        b, clients = server.begin_round()
        server.finish_round(b, clients, host.run(b, clients), {})
    frozen = ~server._mask()
    locals_ = [host.state[c]["local"][frozen] for c in range(2)]
    assert frozen.any() and not np.array_equal(locals_[0], locals_[1])
