"""Uploads are untrusted: hostile ones are rejected with a reason, never reach the model, never end a run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apf_ray import wire
from apf_ray.aggregation import coordinate_wise
from apf_ray.client import ClientHost
from apf_ray.faults import KINDS, corrupt_upload
from apf_ray.records import ClientResult
from apf_ray.run import run
from apf_ray.server import ServerCore
from apf_ray.workload import build_workload
from tests.helpers import tiny_config

# Every strategy, and the uplink containers that change what a values part looks like.
VARIANTS = {
    "fedavg": ("strategy.name=fedavg",),
    "apf": ("strategy.options.threshold=0.95", "strategy.options.alpha=0.5"),
    "cmfl": ("strategy.name=cmfl", "strategy.options.threshold=0.0"),
    "partial_sync": ("strategy.name=partial_sync", "strategy.options.threshold=0.95", "strategy.options.alpha=0.5"),
    "permanent": ("strategy.name=permanent", "strategy.options.threshold=0.95", "strategy.options.alpha=0.5"),
    "topk": ("strategy.name=fedavg", "strategy.uplink=[{name: topk, ratio: 0.1}]"),
    "apf+int8": ("strategy.uplink=[int8]",),
    "plugin": ("strategy.name=tests.plugins.median_strategy:Median",),
    "fedprox": ("strategy.name=fedprox", "strategy.options.mu=0.1"),
    "gwpf": ("strategy.name=gwpf", "strategy.options.threshold=0.5", "strategy.options.min_rounds=1"),
}


@pytest.fixture(scope="module")
def workload():
    return build_workload(tiny_config())


class Round:
    """A server after two honest rounds and the honest results of its third (APF has frozen scalars)."""

    def __init__(self, variant: str, workload, *overrides: str) -> None:
        self.cfg = tiny_config(*VARIANTS[variant], "train.eval_every=1000", *overrides, rounds=10)
        self.workload = workload
        ds = workload.dataset
        host = ClientHost(self.cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
        host.add_clients(dict(enumerate(workload.partitions)))
        server = ServerCore(self.cfg, workload)
        for _ in range(2):
            b, clients = server.begin_round()
            results = host.run(b, [(c, None) for c in clients])
            server.finish_round(b, clients, results, {}, server.downlink_bytes(b, clients))
        self.state = server.state_dict()
        self.broadcast, self.clients = server.begin_round()
        self.down = server.downlink_bytes(self.broadcast, self.clients)
        self.state["rng"] = server.rng.bit_generator.state  # as of after sampling this round
        self.results = host.run(self.broadcast, [(c, None) for c in self.clients])
        self.target = next(r.client_id for r in self.results if "values" in wire.decode_message(r.upload))

    def server(self) -> ServerCore:
        server = ServerCore(self.cfg, self.workload)
        server.load_state_dict(self.state)
        return server

    def finish(self, hostile: dict[int, np.ndarray]):
        server = self.server()
        results = [replace(r, upload=hostile.get(r.client_id, r.upload)) for r in self.results]
        record, recs = server.finish_round(self.broadcast, self.clients, results, {}, self.down)
        return server, record, {c.client_id: c for c in recs}


@pytest.fixture(scope="module", params=list(VARIANTS))
def honest_round(request, workload) -> Round:
    return Round(request.param, workload)


# ---- hostile uploads ------------------------------------------------------------------------------
def _parts(buf: np.ndarray) -> dict[str, np.ndarray]:
    return dict(wire.decode_message(buf))


def _with_meta(buf: np.ndarray, **changes: float) -> np.ndarray:
    parts = _parts(buf)
    meta = wire.decode_scalars(parts["meta"])
    meta.update(changes)
    parts["meta"] = wire.encode_scalars(**meta)
    return wire.encode_message(parts)


def _with_values(buf: np.ndarray, edit) -> np.ndarray:
    """``edit(float32 values) -> values`` applied to the sent values, same container and value type."""
    parts = _parts(buf)
    values = parts["values"]
    dtype = wire.value_dtype(values)
    if values[0] == ord("S"):
        idx, vals, n = wire.decode_sparse(values)
        parts["values"] = wire.encode_sparse(idx, edit(vals), n, "float32" if dtype == "int8" else dtype)
    else:
        new = edit(wire.decode_values(values))
        parts["values"] = wire.encode_values(new, "float32" if dtype == "int8" and not np.isfinite(new).all()
                                             else dtype)
    return wire.encode_message(parts)


def _other_dtype(buf: np.ndarray) -> np.ndarray:
    parts = _parts(buf)
    dtype = wire.value_dtype(parts["values"])
    other = "float16" if dtype != "float16" else "float32"
    if parts["values"][0] == ord("S"):
        idx, vals, n = wire.decode_sparse(parts["values"])
        parts["values"] = wire.encode_sparse(idx, vals, n, other)
    else:
        parts["values"] = wire.encode_values(wire.decode_values(parts["values"]), other)
    return wire.encode_message(parts)


def _other_container(buf: np.ndarray) -> np.ndarray:
    parts = _parts(buf)
    if parts["values"][0] == ord("S"):
        idx, vals, n = wire.decode_sparse(parts["values"])
        parts["values"] = wire.encode_values(wire.densify(idx, vals, n), wire.value_dtype(parts["values"]))
    else:
        vals = wire.decode_values(parts["values"])
        parts["values"] = wire.encode_sparse(np.arange(vals.size), vals, vals.size, wire.value_dtype(parts["values"]))
    return wire.encode_message(parts)


def _resized(buf: np.ndarray, delta: int) -> np.ndarray:
    """Values part with ``delta`` values more (or fewer) than the round synchronises."""
    parts = _parts(buf)
    dtype = wire.value_dtype(parts["values"])
    if parts["values"][0] == ord("S"):
        idx, vals, n = wire.decode_sparse(parts["values"])
        parts["values"] = wire.encode_sparse(idx[idx < n + delta], vals[idx < n + delta], n + delta, dtype)
    else:
        vals = wire.decode_values(parts["values"])
        vals = vals[: vals.size + delta] if delta < 0 else np.concatenate([vals, np.ones(delta, np.float32)])
        parts["values"] = wire.encode_values(vals, dtype)
    return wire.encode_message(parts)


def _poison(kind: str, where: list[int], magnitude: float):
    def edit(vals: np.ndarray) -> np.ndarray:
        out = vals.astype(np.float32, copy=True)
        hit = np.asarray(where) % out.size
        out[hit] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": magnitude}[kind]
        return out
    return edit


def _scaled(factor: float):
    return lambda vals: (vals.astype(np.float64) * factor).astype(np.float32)


def _bad_samples(limit: int):
    return st.one_of(
        st.integers(-10**6, 0),
        st.integers(limit + 1, 10**15),
        st.sampled_from([1e12, 1e300, -71.0, 0.5, 2.5, math.nan, math.inf, -math.inf]),
    )


def hostile(limit: int) -> st.SearchStrategy:
    """Functions turning an honest upload into one the server must refuse."""
    garbage_head = st.integers(0, 255).filter(lambda b: b != ord("F"))
    return st.one_of(
        st.integers(0, 10**6).map(lambda k: lambda b: b[: k % b.size]),
        st.binary(min_size=1, max_size=32).map(
            lambda x: lambda b: np.concatenate([b, np.frombuffer(x, np.uint8)])),
        st.tuples(garbage_head, st.binary(max_size=256)).map(
            lambda t: lambda b: np.frombuffer(bytes([t[0]]) + t[1], np.uint8).copy()),
        st.tuples(st.sampled_from(["nan", "inf", "-inf", "huge"]), st.lists(st.integers(0, 10**6), min_size=1,
                                                                            max_size=8),
                  st.floats(1e20, 3e38) | st.floats(-3e38, -1e20)).map(
            lambda t: lambda b: _with_values(b, _poison(*t))),
        (st.floats(1e4, 1e30) | st.floats(-1e30, -1e4)).map(lambda f: lambda b: _with_values(b, _scaled(f))),
        _bad_samples(limit).map(lambda n: lambda b: _with_meta(b, num_samples=n)),
        st.sampled_from([math.nan, math.inf, -math.inf]).map(lambda x: lambda b: _with_meta(b, loss=x)),
        st.just(_other_dtype),
        st.just(_other_container),
        st.sampled_from([-3, -1, 1, 7]).map(lambda d: lambda b: _resized(b, d)),
        st.just(lambda b: wire.encode_message({**_parts(b), "evil": np.zeros(4, np.uint8)})),
        st.just(lambda b: wire.encode_message({k: v for k, v in _parts(b).items() if k != "meta"})),
        st.integers(1, 50).map(lambda n: lambda b: wire.encode_message(
            {**_parts(b), "buffers": wire.encode_values(np.zeros(n, np.float32))})),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_a_hostile_upload_is_rejected_and_the_global_model_stays_finite(honest_round, data):
    limit = len(honest_round.workload.partitions[honest_round.target])
    mutate = data.draw(hostile(limit))
    honest = next(r.upload for r in honest_round.results if r.client_id == honest_round.target)
    server, record, recs = honest_round.finish({honest_round.target: mutate(honest)})
    assert recs[honest_round.target].status == "rejected", recs[honest_round.target]
    assert recs[honest_round.target].error
    assert np.all(np.isfinite(server.params)) and np.all(np.isfinite(server.buffers))
    assert record.clients_rejected == 1
    assert all(c.status in ("ok", "skipped", "discarded") for cid, c in recs.items() if cid != honest_round.target)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data())
def test_several_hostile_clients_at_once_never_crash_the_round(honest_round, data):
    victims = data.draw(st.lists(st.sampled_from(honest_round.clients), min_size=1, unique=True))
    garbage = {cid: b"\x00" + data.draw(st.binary(max_size=64)) for cid in victims}
    server, record, recs = honest_round.finish({cid: np.frombuffer(g, np.uint8) for cid, g in garbage.items()})
    assert all(recs[cid].status == "rejected" for cid in victims)
    assert np.all(np.isfinite(server.params))
    assert record.quorum_met == (len(honest_round.clients) - len(victims) >= honest_round.cfg.quorum())


# ---- named cases from the issue ------------------------------------------------------------------
@pytest.mark.parametrize("claim", [0, -71, 1e12, 1e300])
def test_a_sample_count_beyond_the_clients_partition_is_rejected(workload, claim):
    rnd = Round("fedavg", workload)
    before = rnd.server().params.copy()
    honest = next(r.upload for r in rnd.results if r.client_id == rnd.target)
    server, record, recs = rnd.finish({rnd.target: _with_meta(honest, num_samples=claim)})
    assert recs[rnd.target].status == "rejected" and "samples" in recs[rnd.target].error
    assert record.aggregated and np.all(np.isfinite(server.params)) and not np.array_equal(server.params, before)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_a_round_whose_aggregate_is_not_finite_is_discarded_and_the_model_kept(workload):
    rnd = Round("plugin", workload)  # params + 2 × median: finite uploads can overflow float32
    rnd.cfg = tiny_config(*VARIANTS["plugin"], "strategy.options.step=2", "train.eval_every=1000",
                          "defence.max_update_ratio=null", rounds=10)
    before = rnd.server().params.copy()
    top = float(np.finfo(np.float32).max)
    near_max = {r.client_id: _with_values(r.upload, lambda v: np.full_like(v, top)) for r in rnd.results}
    server, record, recs = rnd.finish(near_max)
    assert record.quorum_met and not record.aggregated
    assert server.params.tobytes() == before.tobytes()
    assert {c.status for c in recs.values()} == {"discarded"}
    assert "not finite" in recs[rnd.target].error and record.clients_discarded == 3


def test_an_absolute_norm_bound_rejects_larger_updates(workload):
    rnd = Round("fedavg", workload, "defence.max_update_norm=1e-6")  # the round is sent its bound
    _, record, recs = rnd.finish({})
    assert record.clients_rejected == 3 and "norm" in recs[rnd.target].error and not record.quorum_met


@pytest.mark.parametrize("kind", KINDS)
def test_every_injected_corruption_is_refused_by_the_server(workload, kind):
    rnd = Round("apf", workload)
    honest = next(r.upload for r in rnd.results if r.client_id == rnd.target)
    bad = corrupt_upload(honest, kind, np.random.default_rng(0))
    _, _, recs = rnd.finish({rnd.target: bad})
    assert recs[rnd.target].status == "rejected"


# ---- robust aggregation --------------------------------------------------------------------------
def test_median_and_trimmed_mean_ignore_a_minority_and_leave_unsynchronised_positions_at_zero():
    honest = [np.array([1.0, 2.0, 3.0, 4.0], np.float32) + i * 0.1 for i in range(4)]
    attacker = np.array([1e6, -1e6, 1e6, 1e6], np.float32)
    mask = np.array([True, True, False, True])
    median = coordinate_wise([*honest, attacker], "median", positions=mask)
    trimmed = coordinate_wise([*honest, attacker], "trimmed_mean", 0.2, positions=mask)
    for out in (median, trimmed):
        assert out[2] == 0.0 and np.all(np.abs(out[mask] - np.array([1.2, 2.2, 4.2])) < 0.2)
    np.testing.assert_allclose(coordinate_wise(honest, "trimmed_mean", 0.0), np.mean(honest, axis=0), rtol=1e-6)


@pytest.mark.parametrize("aggregation", ["median", "trimmed_mean"])
def test_robust_aggregation_trains_and_keeps_frozen_scalars_bit_identical(tmp_path, aggregation):
    cfg = tiny_config(f"defence.aggregation={aggregation}", "defence.trim_fraction=0.34",
                      *VARIANTS["apf"][:2], "faults.corrupt_upload_prob=0.3", "faults.corrupt_kind=scale",
                      "defence.max_update_ratio=null", rounds=4)
    summary = run(cfg, tmp_path)
    assert summary["rounds"] == 4 and summary["final_accuracy"] is not None


# ---- end to end: faults injected into a run ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_with_corrupted_uploads_finishes_and_records_each_rejection(tmp_path, kind):
    cfg = tiny_config("faults.corrupt_upload_prob=0.5", f"faults.corrupt_kind={kind}", "cluster.min_clients=1",
                      rounds=3)
    summary = run(cfg, tmp_path)
    clients = pq.read_table(tmp_path / "clients.parquet").to_pylist()
    rejected = [c for c in clients if c["status"] == "rejected"]
    assert rejected and all(c["error"] for c in rejected)
    assert summary["clients_rejected"] == len(rejected) and summary["clients_dropped"] == 0
    assert summary["rounds"] == 3 and summary["final_accuracy"] is not None
    rounds = pq.read_table(tmp_path / "rounds.parquet").to_pylist()
    assert sum(r["clients_rejected"] for r in rounds) == len(rejected)


def test_injected_corruption_is_seeded_per_round_and_client():
    cfg = tiny_config("faults.corrupt_upload_prob=0.5", "faults.corrupt_kind=garbage")
    from apf_ray.faults import corrupt_rng

    picks = [[corrupt_rng(cfg.seed, 0.5, r, c) is not None for c in range(6)] for r in range(1, 5)]
    again = [[corrupt_rng(cfg.seed, 0.5, r, c) is not None for c in range(6)] for r in range(1, 5)]
    assert picks == again and any(map(any, picks)) and not all(map(all, picks))


def test_an_upload_result_for_a_client_not_sampled_is_ignored(workload):
    rnd = Round("fedavg", workload)
    stranger = next(c for c in range(6) if c not in rnd.clients)
    server = rnd.server()
    extra = [*rnd.results, ClientResult(stranger, rnd.results[0].upload)]
    _, recs = server.finish_round(rnd.broadcast, rnd.clients, extra, {}, rnd.down)
    assert stranger not in {c.client_id for c in recs}


def test_buffers_must_be_finite_and_change_within_their_bound():
    from apf_ray.config import DefenceConfig
    from apf_ray.strategies import DecodedUpload
    from apf_ray.validation import UploadValidator

    validator = UploadValidator(DefenceConfig(), partition_sizes={0: 10}, num_params=4, num_buffers=3)
    params, buffers = np.ones(4, np.float32), np.ones(3, np.float32)

    def upload(new_buffers):
        return DecodedUpload(0, np.full(4, 0.1, np.float32), np.asarray(new_buffers, np.float32), 10, 0.5, 100)

    assert validator.check(upload([1.5, 0.5, 30.0]), params, buffers) is None  # BatchNorm statistics move a lot
    assert "NaN or inf" in validator.check(upload([1.0, np.nan, 1.0]), params, buffers)
    assert "max_buffer_ratio" in validator.check(upload([1e10, 1.0, 1.0]), params, buffers)
    assert "shape" in validator.check(upload([1.0, 1.0]), params, buffers)


def test_update_norm_is_exact_for_huge_finite_values_and_counts_every_non_finite_one():
    from apf_ray.config import DefenceConfig
    from apf_ray.strategies import DecodedUpload
    from apf_ray.validation import UploadValidator

    n = 100_003  # longer than any internal block
    validator = UploadValidator(DefenceConfig(max_update_ratio=None, max_update_norm=1e40), {0: 10}, n, 0)
    params, none = np.ones(n, np.float32), np.zeros(0, np.float32)
    huge = np.full(n, 3e38, np.float32)  # squares overflow float32, not float64: norm 3e38·√n ≈ 9.5e40
    assert "exceeds the bound" in validator.check(DecodedUpload(0, huge, none, 10, 0.5, 0), params, none)
    bad = np.zeros(n, np.float32)
    bad[[7, 50_000, n - 1]] = [np.nan, np.inf, -np.inf]
    assert validator.check(DecodedUpload(0, bad, none, 10, 0.5, 0), params, none) == \
        "update holds 3 NaN or inf value(s)"


def test_weighted_mean_equals_one_float64_pass_in_upload_order_bit_for_bit():
    from apf_ray.aggregation import weighted_mean

    rng = np.random.default_rng(3)
    n = 200_001  # several blocks and a partial one
    vectors = [rng.normal(scale=10.0 ** e, size=n).astype(np.float32) for e in (-6, 0, 3, 30)]
    weights = [3, 117, 1, 40]
    acc = np.zeros(n, dtype=np.float64)
    for vec, w in zip(vectors, np.asarray(weights, np.float64), strict=True):
        acc += w * vec.astype(np.float64)
    expected = (acc / sum(weights)).astype(np.float32)
    assert weighted_mean(vectors, weights).tobytes() == expected.tobytes()


# ---- the command line: accuracy under every corruption kind --------------------------------------
# IID digits, so that a run without 30% of its uploads learns what the clean run learns (on the
# non-IID default workload the same holds at 100 rounds: bench/faults.py, README).
ACCURACY_RUN = ["--inprocess", "--quiet", "--set", "data.partitioner=iid", "--set", "data.partition_options={}",
                "--set", "data.num_clients=10", "--set", "train.clients_per_round=5", "--set", "train.rounds=25",
                "--set", "output.tensorboard=false", "--set", "output.plots=false",
                "--set", "output.checkpoint_every=0"]


def _cli_accuracy(out: Path, *extra: str) -> dict:
    from apf_ray.cli import main

    assert main(["train", *ACCURACY_RUN, "--output", str(out), *extra]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def clean_accuracy(tmp_path_factory) -> float:
    return _cli_accuracy(tmp_path_factory.mktemp("clean") / "run")["final_accuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_train_with_30_percent_corrupted_uploads_ends_within_2_points_of_the_clean_run(tmp_path, clean_accuracy,
                                                                                       kind):
    summary = _cli_accuracy(tmp_path / "run", "--set", "faults.corrupt_upload_prob=0.3",
                            "--set", f"faults.corrupt_kind={kind}")
    assert summary["clients_rejected"] > 0 and summary["rounds"] == 25
    assert abs(summary["final_accuracy"] - clean_accuracy) <= 0.02, (summary["final_accuracy"], clean_accuracy)


def test_a_model_so_large_that_its_test_loss_overflows_is_recorded_without_ending_the_run(workload, tmp_path):
    rnd = Round("fedavg", workload)
    rnd.cfg = tiny_config(*VARIANTS["fedavg"], rounds=10)  # evaluates every round
    server = rnd.server()
    server.params = np.full_like(server.params, 1e20)  # finite, as an attack within no bound could leave it
    record, _ = server.finish_round(rnd.broadcast, rnd.clients, rnd.results, {}, rnd.down)
    assert record.test_accuracy is not None and record.test_loss is None
    json.dumps(asdict(record), allow_nan=False)  # the journal's strict JSON


def test_a_scale_corruption_multiplies_every_sent_value_by_the_configured_factor(workload):
    rnd = Round("fedavg", workload)
    honest = next(r.upload for r in rnd.results if r.client_id == rnd.target)
    flipped = corrupt_upload(honest, "scale", np.random.default_rng(0), scale=-10.0)
    values = [wire.decode_values(_parts(buf)["values"]) for buf in (honest, flipped)]
    np.testing.assert_array_equal(values[1], values[0] * np.float32(-10))
