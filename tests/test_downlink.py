"""Download accounting: the bytes counted for each client are the bytes of the buffer it would be sent."""

from __future__ import annotations

import numpy as np
import pytest

from apf_ray import wire
from apf_ray.downlink import DownlinkTracker


def _tracker_after(rng: np.random.Generator, n: int, rounds: int, change_prob: float) -> tuple[DownlinkTracker, list]:
    """A tracker that saw ``rounds`` aggregations moving a random share of the scalars, masks changing."""
    tracker = DownlinkTracker(n)
    params = rng.normal(size=n).astype(np.float32)
    for version in range(1, rounds + 1):
        new = params.copy()
        moved = rng.random(n) < change_prob
        new[moved] += 1.0
        tracker.record_aggregation(params, new, version)
        params = new
        if version % 3 == 0:
            tracker.record_mask_change(version)
    return tracker, params


@pytest.mark.parametrize("change_prob", [0.0, 0.001, 0.02, 0.3, 1.0])
def test_bytes_counted_equal_the_encoded_payload_for_every_held_version(change_prob):
    rng = np.random.default_rng(1)
    n, rounds = 5000, 8
    tracker, params = _tracker_after(rng, n, rounds, change_prob)
    tracker.record_received([1, 2, 3, 4, 5, 6], 0)
    tracker.record_received([2], 3)
    tracker.record_received([3], 5)
    tracker.record_received([4], rounds)
    tracker.record_received([5], rounds + 2)  # held past the newest aggregation (rounds not aggregated)
    buffers = rng.normal(size=7).astype(np.float32)
    extras = {"signs": wire.encode_mask(rng.random(n) < 0.5)}
    for mask in (None, rng.random(n) < 0.7):
        for bufs, extra in ((buffers, extras), (np.zeros(0, np.float32), {})):
            clients = [0, 1, 2, 3, 4, 5, 6]
            counted = tracker.bytes_for(clients, params, bufs, mask, extra)
            encoded = {c: int(tracker.payload(tracker.held_version.get(c), params, bufs, mask, extra).nbytes)
                       for c in clients}
            assert counted == encoded


def test_bytes_counted_after_a_state_round_trip_equal_the_original_trackers():
    rng = np.random.default_rng(2)
    tracker, params = _tracker_after(rng, 3000, 6, 0.01)
    tracker.record_received([0, 1], 2)
    copy = DownlinkTracker(3000)
    copy.load_state_dict(tracker.state_dict())
    new = params.copy()
    new[:10] += 1
    for t in (tracker, copy):
        t.record_aggregation(params, new, 7)
    mask = np.ones(3000, bool)
    assert copy.bytes_for([0, 1, 2], new, np.zeros(0, np.float32), mask, {}) == \
        tracker.bytes_for([0, 1, 2], new, np.zeros(0, np.float32), mask, {})


def test_downlink_part_sizes_equal_encode_downlink_at_both_layout_boundaries():
    n = 4096
    params = np.arange(n, dtype=np.float32)
    # indices give way to a bitmap at 4k = n/8 (k = 128); the delta gives way to the full model
    # at 11 + n/8 + 4k = 6 + 4n (k = 3966)
    for k in [*range(120, 136), *range(3960, 3972), None]:
        changed = None if k is None else np.arange(n) < k
        for mask in (None, np.arange(n) % 3 > 0):
            buf = wire.encode_downlink(params, changed=changed, mask=mask)
            parts = wire.downlink_part_nbytes(n, k, mask is not None)
            assert wire.message_nbytes(parts) == buf.nbytes
            assert {name: p.nbytes for name, p in wire.decode_message(buf).items()} == parts


@pytest.mark.parametrize("change_prob", [0.0, 0.002, 0.05, 0.6])
def test_a_client_holding_any_version_decodes_its_payload_into_the_broadcast_model_bit_exactly(change_prob):
    """What is counted can be sent: the payload a client holding version v is counted for, decoded
    against that client's own copy of version v (model and mask), is the model the server
    broadcasts this round, bit for bit, with the current mask, buffers and strategy extras."""
    rng = np.random.default_rng(3)
    n, rounds = 4000, 9
    tracker = DownlinkTracker(n)
    params = rng.normal(size=n).astype(np.float32)
    mask = rng.random(n) < 0.8
    held = {0: (params.copy(), mask.copy())}  # version -> what a client that downloaded it keeps
    for version in range(1, rounds + 1):
        new = params.copy()
        moved = rng.random(n) < change_prob
        new[moved] += rng.normal(size=int(moved.sum())).astype(np.float32)
        tracker.record_aggregation(params, new, version)
        params = new
        if version % 4 == 0:
            mask = rng.random(n) < 0.6
            tracker.record_mask_change(version)
        held[version] = (params.copy(), mask.copy())
    buffers = rng.normal(size=5).astype(np.float32)
    extras = {"signs": wire.encode_mask(rng.random(n) < 0.5)}
    for version in [None, *held]:
        payload = tracker.payload(version, params, buffers, mask, extras)
        parts = wire.decode_message(payload)
        cached_params, cached_mask = held[version] if version is not None else (None, None)
        got_params, got_mask = wire.decode_downlink(parts["model"], cached_params, cached_mask)
        assert got_params.tobytes() == params.tobytes(), version
        assert np.array_equal(got_mask, mask), version
        assert wire.decode_values(parts["buffers"]).tobytes() == buffers.tobytes()
        assert parts["signs"].tobytes() == extras["signs"].tobytes()
        client = 100 if version is None else version  # client 100 never downloaded anything
        if version is not None:
            tracker.record_received([client], version)
        assert tracker.bytes_for([client], params, buffers, mask, extras) == {client: payload.nbytes}
