"""The Ray-free round: uploads, aggregation, frozen values, downlink deltas, quorum."""

from __future__ import annotations

import numpy as np
import pytest

from apf_ray.client import ClientHost
from apf_ray.server import ServerCore
from apf_ray.wire import decode_downlink, decode_message
from apf_ray.workload import build_workload, sampling_schedule
from tests.helpers import tiny_config

# alpha=0.5, T=0.95: a scalar whose update changed sign once since its last check has
# P = |E|/A < 0.95 and is judged stable from check 2 on.
FREEZE_FAST = ("strategy.options.threshold=0.95", "strategy.options.alpha=0.5")


@pytest.fixture(scope="module")
def workload():
    return build_workload(tiny_config())


def _host(cfg, wl):
    ds = wl.dataset
    host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
    host.add_clients(dict(enumerate(wl.partitions)))
    return host


def _round(server, host, states=None):
    """One round; ``states`` (client id → strategy state) is read and updated, as the engine does."""
    states = {} if states is None else states
    b, clients = server.begin_round()
    results = host.run(b, [(c, states.get(c)) for c in clients])
    states.update({r.client_id: r.state for r in results if r.state is not None})
    return b, clients, results, server.finish_round(b, clients, results, {}, server.downlink_bytes(b, clients))


def test_sampling_schedule_names_the_clients_the_server_samples_each_round(workload):
    cfg = tiny_config("train.clients_per_round=4")
    server = ServerCore(cfg, workload)
    sampled = [server.begin_round()[1] for _ in range(6)]
    assert sampled == sampling_schedule(cfg.seed, workload.num_clients, 4, 6)
    assert len({tuple(s) for s in sampled}) > 1  # rounds draw different clients


def test_apf_upload_carries_exactly_the_active_scalars(workload):
    cfg = tiny_config(*FREEZE_FAST)
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    sizes = []
    for _ in range(3):
        b, _, results, _ = _round(server, host)
        active = server.num_params if b.plan.sync_mask is None else int(b.plan.sync_mask.sum())
        sizes.append((active, {r.upload.nbytes for r in results}))
    (a0, s0), *rest = sizes
    assert len(s0) == 1
    frozen_rounds = [(a, s) for a, s in rest if a < a0]
    assert frozen_rounds, "alpha=0.5, T=0.95 must freeze scalars after the second check"
    for a, s in frozen_rounds:
        assert s == {next(iter(s0)) - 4 * (a0 - a)}  # 4 float32 bytes per frozen scalar fewer


def test_frozen_values_never_move_even_a_negative_zero_and_synchronised_ones_get_the_weighted_mean(workload):
    cfg = tiny_config(*FREEZE_FAST)
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    for _ in range(2):
        _round(server, host)
    b, clients = server.begin_round()
    synced = b.plan.sync_mask
    frozen = ~synced
    assert frozen.any() and synced.any()
    server.params[np.flatnonzero(frozen)[0]] = -0.0  # adding +0.0 to it would clear the sign bit
    before = server.params.copy()
    results = host.run(b, [(c, None) for c in clients])
    ups = [server.strategy.decode_upload(b.plan, r.client_id, r.upload) for r in results]
    for u in ups:  # compact on the wire and in the server; the client's model at frozen positions is the server's
        assert u.values.shape == (synced.sum(),) and u.update.shape == before.shape
        assert not u.update[frozen].any()
    weights = np.array([u.num_samples for u in ups], np.float64)
    mean = (np.stack([u.values for u in ups]).astype(np.float64) * weights[:, None]).sum(0) / weights.sum()
    server.finish_round(b, clients, results, {}, server.downlink_bytes(b, clients))
    assert server.params[frozen].tobytes() == before[frozen].tobytes()
    np.testing.assert_allclose(server.params[synced], before[synced] + mean.astype(np.float32), rtol=0, atol=1e-7)


def test_uploads_decoded_against_different_masks_are_combined_densely(workload):
    from apf_ray.strategies import DecodedUpload

    cfg = tiny_config()
    strategy = ServerCore(cfg, workload).strategy
    n = strategy.num_params
    first, second = np.arange(n) % 2 == 0, np.arange(n) % 3 == 0
    ups = [DecodedUpload(0, np.ones(first.sum(), np.float32), np.zeros(0, np.float32), 1, 0.0, 0, first),
           DecodedUpload(1, np.full(second.sum(), 3, np.float32), np.zeros(0, np.float32), 1, 0.0, 0, second)]
    params, _ = strategy.aggregate(np.zeros(n, np.float32), np.zeros(0, np.float32), ups)
    expected = (first * 1.0 + second * 3.0) / 2
    assert params.tobytes() == expected.astype(np.float32).tobytes()


def test_returning_client_downlink_is_a_delta_that_reconstructs_the_model(workload):
    cfg = tiny_config(*FREEZE_FAST, "train.clients_per_round=6")
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    for _ in range(2):
        _round(server, host)
    held_params, held_mask = server.params.copy(), server.active_mask()
    assert not held_mask.all()
    _round(server, host)
    delta = server.downlink.payload(2, server.params, server.buffers, server.strategy.sync_mask, {})
    full = server.downlink.payload(None, server.params, server.buffers, server.strategy.sync_mask, {})
    assert delta.nbytes < full.nbytes
    params, mask = decode_downlink(decode_message(delta)["model"], held_params, held_mask)
    assert params.tobytes() == server.params.tobytes()
    assert np.array_equal(mask, server.active_mask())


def test_round_below_quorum_keeps_the_model_and_counts_failed_apart_from_discarded(workload):
    cfg = tiny_config("cluster.min_clients=3")
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    b, clients = server.begin_round()
    results = host.run(b, [(c, None) for c in clients])[:2]
    before = server.params.copy()
    rec, recs = server.finish_round(b, clients, results, {clients[2]: "timeout"}, server.downlink_bytes(b, clients))
    assert server.params.tobytes() == before.tobytes()
    assert not rec.quorum_met and not rec.aggregated
    assert (rec.clients_reported, rec.clients_dropped, rec.clients_discarded) == (2, 1, 2)
    assert [c.status for c in recs] == ["discarded", "discarded", "timeout"]
    assert "quorum" in recs[0].error


def test_partial_sync_clients_drift_apart_at_unsynchronised_positions(workload):
    cfg = tiny_config("strategy.name=partial_sync", *FREEZE_FAST, "train.clients_per_round=6")
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    states = {}
    for _ in range(3):
        _round(server, host, states)
    frozen = ~server.active_mask()
    locals_ = [states[c]["local"][frozen] for c in range(2)]
    assert frozen.any() and not np.array_equal(locals_[0], locals_[1])


def test_server_state_round_trips_through_state_dict(workload):
    cfg = tiny_config(*FREEZE_FAST)
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    for _ in range(2):
        _round(server, host)
    copy = ServerCore(cfg, workload)
    copy.load_state_dict(server.state_dict())
    for s in (server, copy):
        _round(s, host)
    assert copy.params.tobytes() == server.params.tobytes()
    assert np.array_equal(copy.active_mask(), server.active_mask())
    assert (copy.cum_up, copy.cum_down) == (server.cum_up, server.cum_down)


def test_a_changed_threshold_replaces_the_restored_one_and_everything_else_is_kept(workload):
    cfg = tiny_config(*FREEZE_FAST)
    server, host = ServerCore(cfg, workload), _host(cfg, workload)
    for _ in range(2):
        _round(server, host)
    state = server.state_dict()
    mutated = ServerCore(tiny_config("strategy.options.threshold=0.3", "strategy.options.alpha=0.5"), workload)
    mutated.load_state_dict(state)
    assert mutated.strategy.threshold == 0.3  # the mutated knob
    assert mutated.round == server.round and mutated.params.tobytes() == server.params.tobytes()
    ours, theirs = server.strategy.controller.state_dict(), mutated.strategy.controller.state_dict()
    for key in ("ref", "ema", "abs_ema", "period", "remaining"):
        assert ours[key].tobytes() == theirs[key].tobytes(), key
    same = ServerCore(cfg, workload)
    same.load_state_dict(state)
    assert same.strategy.threshold == server.strategy.threshold  # unchanged config: the tightened T stays
