"""The strategy contract: defences no strategy can skip, selection and per-client plans, the
client half's set-up and state, FedProx and GWPF end to end (in-process, real training)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from apf_ray import wire
from apf_ray.aggregation import coordinate_wise
from apf_ray.client import ClientHost
from apf_ray.config import ConfigError, build_config
from apf_ray.metrics import read_history
from apf_ray.resume import load_resume_point
from apf_ray.run import run
from apf_ray.server import ServerCore
from apf_ray.strategies.gwpf import ACCUMULATED
from apf_ray.tuning import load_tune_spec
from apf_ray.variants import variant_overrides
from apf_ray.workload import build_workload
from tests.helpers import Crash, CrashAfter, tiny_config
from tests.plugins.contract_strategies import CHOSEN

REPO = Path(__file__).resolve().parent.parent
DENSE_MEAN = "strategy.name=tests.plugins.contract_strategies:DenseMean"
POISONED = ("faults.corrupt_upload_prob=0.34", "faults.corrupt_kind=scale", "faults.corrupt_scale=-5")
"""About a third of the uploads sign-flipped and boosted: bad, but within the norm bound."""


@pytest.fixture(scope="module")
def workload():
    return build_workload(tiny_config())


class Clients:
    """A :class:`ClientHost` with each client's strategy state kept between rounds, as the round
    engine keeps it (``RoundEngine._execute``), so a test can step a round's halves by hand."""

    def __init__(self, host: ClientHost) -> None:
        self.host = host
        self.state: dict[int, dict] = {}

    def run(self, broadcast, clients: list[int]) -> list:
        results = self.host.run(broadcast, [(c, self.state.get(c)) for c in clients])
        self.state.update({r.client_id: r.state for r in results if r.state is not None})
        return results


def engine(cfg, workload) -> tuple[ServerCore, Clients]:
    ds = workload.dataset
    host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
    host.add_clients(dict(enumerate(workload.partitions)))
    return ServerCore(cfg, workload), Clients(host)


def final_params(run_dir) -> np.ndarray:
    return load_resume_point(run_dir).server["params"]


# ---- robust aggregation is a filter no strategy can skip -------------------------------------------
def test_a_plugin_overriding_aggregate_combines_the_configured_median_of_its_uploads(workload):
    cfg = tiny_config(DENSE_MEAN, "defence.aggregation=median", rounds=1)
    server, host = engine(cfg, workload)
    broadcast, clients = server.begin_round()
    results = host.run(broadcast, clients)
    poisoned = results[0]
    parts = dict(wire.decode_message(poisoned.upload))
    parts["values"] = wire.encode_values(wire.decode_values(parts["values"]) * np.float32(-5), "float32")
    poisoned.upload = wire.encode_message(parts)
    deltas = [server.strategy.decode_upload(broadcast.plan, r.client_id, r.upload).values for r in results]
    before = server.params.copy()
    _, recs = server.finish_round(broadcast, clients, results, {}, server.downlink_bytes(broadcast, clients))
    assert [c.status for c in recs] == ["ok"] * len(clients)  # the poisoned upload passed validation
    assert np.array_equal(server.params, before + coordinate_wise(deltas, "median"))
    assert not np.array_equal(server.params, before + np.mean(deltas, axis=0, dtype=np.float32))


def test_a_plugin_overriding_aggregate_trains_as_the_builtin_under_median_with_poisoned_clients(tmp_path):
    plugin = run(tiny_config(DENSE_MEAN, "defence.aggregation=median", *POISONED, rounds=3), tmp_path / "plugin")
    builtin = run(tiny_config("strategy.name=fedavg", "defence.aggregation=median", *POISONED, rounds=3),
                  tmp_path / "builtin")
    unguarded = run(tiny_config(DENSE_MEAN, *POISONED, rounds=3), tmp_path / "mean")
    assert plugin["rounds_not_aggregated"] == builtin["rounds_not_aggregated"] == 0
    assert final_params(tmp_path / "plugin").tobytes() == final_params(tmp_path / "builtin").tobytes()
    assert final_params(tmp_path / "mean").tobytes() != final_params(tmp_path / "plugin").tobytes()
    assert unguarded["rounds_not_aggregated"] == 0


# ---- selection, per-client plans, the client half ------------------------------------------------
def test_the_strategy_selects_clients_and_gives_each_its_own_plan(workload):
    cfg = tiny_config("strategy.name=tests.plugins.contract_strategies:HalfPlans", rounds=2)
    server, host = engine(cfg, workload)
    for round_idx in (1, 2):
        before = server.params.copy()
        broadcast, clients = server.begin_round()
        assert clients == CHOSEN and set(broadcast.client_plans) == set(CHOSEN)
        results = host.run(broadcast, clients)
        _, recs = server.finish_round(broadcast, clients, results, {}, server.downlink_bytes(broadcast, clients))
        assert [c.status for c in recs] == ["ok"] * 3
        n, half = server.num_params, server.num_params // 2
        sent = {0: half, 1: n - half - 1}  # float32 values each: the first half, the second but the last scalar
        assert recs[0].bytes_up - recs[1].bytes_up == 4 * (sent[0] - sent[1])
        assert server.params[-1] == before[-1]  # synchronised by nobody: untouched
        assert not np.array_equal(server.params[:half], before[:half])
        assert not np.array_equal(server.params[half:-1], before[half:-1])
        for cid in CHOSEN:  # the client half was set up, its state kept between rounds
            assert host.state[cid] == {"rounds": round_idx, "num_params": server.num_params}


def test_a_cmfl_skip_records_the_relevance_the_client_sent(workload):
    cfg = tiny_config("strategy.name=cmfl", "strategy.options.threshold=1.0", rounds=2)
    server, host = engine(cfg, workload)
    for _ in range(2):
        broadcast, clients = server.begin_round()
        _, recs = server.finish_round(broadcast, clients, host.run(broadcast, clients), {},
                                      server.downlink_bytes(broadcast, clients))
    skipped = [c for c in recs if c.status == "skipped"]
    assert skipped, [c.status for c in recs]
    for rec in skipped:
        assert rec.error.startswith("relevance=") and 0 <= float(rec.error.partition("=")[2]) < 1


# ---- FedProx --------------------------------------------------------------------------------------
def test_fedprox_with_mu_zero_is_fedavg_and_its_proximal_term_shrinks_every_update(workload):
    def updates(*overrides):
        cfg = tiny_config(*overrides, "train.local_steps=10", rounds=1)
        server, host = engine(cfg, workload)
        broadcast, clients = server.begin_round()
        return [server.strategy.decode_upload(broadcast.plan, r.client_id, r.upload).values
                for r in host.run(broadcast, clients)]

    fedavg = updates("strategy.name=fedavg")
    free = updates("strategy.name=fedprox", "strategy.options.mu=0")
    pulled = updates("strategy.name=fedprox", "strategy.options.mu=5")
    assert all(np.array_equal(a, b) for a, b in zip(fedavg, free, strict=True))
    assert all(np.linalg.norm(p) < np.linalg.norm(f) for p, f in zip(pulled, free, strict=True))


def test_fedprox_trains_end_to_end_with_an_uplink_chain(tmp_path):
    summary = run(tiny_config("strategy.name=fedprox", "strategy.options.mu=0.1",
                              "strategy.uplink=[{name: topk, ratio: 0.1}, int8]", rounds=3), tmp_path)
    assert summary["rounds"] == 3 and summary["rounds_not_aggregated"] == 0
    assert summary["config"]["strategy"]["options"] == {"mu": 0.1}


# ---- GWPF -----------------------------------------------------------------------------------------
GWPF = ("strategy.name=gwpf", "strategy.options.threshold=0.02", "strategy.options.thaw_threshold=0.02",
        "output.checkpoint_every=2")


def test_gwpf_freezes_thaws_on_votes_and_counts_the_votes_in_the_uplink(tmp_path):
    run(tiny_config(*GWPF, rounds=7), tmp_path)
    rounds = read_history(tmp_path)
    frozen = [r.frozen_fraction for r in rounds]
    assert frozen[0] == 0 and max(frozen) > 0.3, frozen
    assert any(later < earlier for earlier, later in itertools.pairwise(frozen)), f"nothing thawed: {frozen}"
    assert all(r.aggregated for r in rounds)
    clients = pq.read_table(tmp_path / "clients.parquet").to_pandas()
    assert (clients["status"] == "ok").all()


def test_gwpf_resumes_with_its_clients_accumulated_changes_and_equals_the_uninterrupted_run(tmp_path):
    cfg = tiny_config(*GWPF, rounds=7)
    run(cfg, tmp_path / "full")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "crash", callbacks=[CrashAfter(5)])
    point = load_resume_point(tmp_path / "crash")
    assert point.round == 4
    assert any(ACCUMULATED in state.arrays for state in point.stored.values())  # the client half's state was saved
    run(cfg, tmp_path / "crash", resume=point)
    assert final_params(tmp_path / "crash").tobytes() == final_params(tmp_path / "full").tobytes()
    assert [r.bytes_up for r in read_history(tmp_path / "crash")] == [
        r.bytes_up for r in read_history(tmp_path / "full")]


def test_gwpf_refuses_an_upload_whose_votes_do_not_match_the_frozen_scalars(workload):
    cfg = tiny_config(*GWPF, "train.eval_every=1000", rounds=6)
    server, host = engine(cfg, workload)
    while server.strategy.sync_mask is None:
        broadcast, clients = server.begin_round()
        server.finish_round(broadcast, clients, host.run(broadcast, clients), {},
                            server.downlink_bytes(broadcast, clients))
        assert server.round < 6, "nothing froze"
    broadcast, clients = server.begin_round()
    results = host.run(broadcast, clients)
    parts = dict(wire.decode_message(results[0].upload))
    parts["thaw"] = wire.encode_mask(np.ones(3, dtype=bool))
    results[0].upload = wire.encode_message(parts)
    _, recs = server.finish_round(broadcast, clients, results, {}, server.downlink_bytes(broadcast, clients))
    assert recs[0].status == "rejected" and "thaw votes" in recs[0].error
    assert [c.status for c in recs[1:]] == ["ok"] * (len(clients) - 1)


# ---- compare and tune take the new strategies' options ---------------------------------------------
def test_fedprox_and_gwpf_are_compare_variants_and_their_options_are_searchable(tmp_path):
    base = tiny_config()
    for spec, name, option, uplink in [("fedprox:mu=0.5", "fedprox", ("mu", 0.5), []),
                                       ("gwpf:threshold=0.02+topk:ratio=0.1", "gwpf", ("threshold", 0.02),
                                        [{"name": "topk", "ratio": 0.1}])]:
        cfg = build_config(base.to_dict(), variant_overrides(spec, base.strategy.name))
        assert cfg.strategy.name == name and cfg.strategy.options[option[0]] == option[1], cfg.strategy
        assert cfg.strategy.uplink == uplink
    spec, base = load_tune_spec(REPO / "tune_configs" / "gwpf.yaml")
    assert base.strategy.name == "gwpf" and "strategy.options.thaw_threshold" in spec.search_space
    search = tmp_path / "prox.yaml"
    search.write_text(yaml.safe_dump({
        "name": "prox", "base": str(REPO / "configs" / "digits-lenet5.yaml"),
        "overrides": {"strategy.name": "fedprox"}, "objective": [{"metric": "accuracy"}],
        "search_space": {"strategy.options.mu": {"loguniform": [0.001, 20.0]}}}))
    with pytest.raises(ConfigError, match=r"search_space\.strategy\.options\.mu can take 20\.0"):
        load_tune_spec(search)


@pytest.mark.ray
def test_gwpf_per_client_plans_and_fedprox_on_ray_equal_the_in_process_runs(local_ray, tmp_path):
    """Client state, per-client plans and the gradient term cross the actors as they do in-process."""
    for i, overrides in enumerate([GWPF, ("strategy.name=tests.plugins.contract_strategies:HalfPlans",),
                                   ("strategy.name=fedprox", "strategy.options.mu=0.1")]):
        cfg = tiny_config(*overrides, rounds=5)
        on_ray = run(cfg, tmp_path / f"ray{i}", backend="ray")
        local = run(cfg, tmp_path / f"local{i}")
        assert on_ray["bytes_up"] == local["bytes_up"] and on_ray["bytes_down"] == local["bytes_down"], overrides
        np.testing.assert_allclose(final_params(tmp_path / f"ray{i}"), final_params(tmp_path / f"local{i}"),
                                   rtol=1e-6, atol=1e-7)
