"""Per-client strategy state on disk (apf_ray/client_store.py): exact, bounded in memory, checkpointed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from apf_ray.backends import EngineBackend, HostExecutor, InProcessBackend
from apf_ray.checkpoint import STATE_FILE, list_checkpoints
from apf_ray.client import ClientHost
from apf_ray.client_store import (
    ClientStateStore,
    StoredState,
    StoreLocation,
    checkpointed_files,
    collect_garbage,
    open_store,
    self_contained,
)
from apf_ray.engine import ClientCall, ClientExecutor
from apf_ray.records import Broadcast, ClientResult, RoundPlan
from apf_ray.resume import load_resume_point, read_resume_point
from apf_ray.run import run
from apf_ray.strategies import make_strategy
from apf_ray.workload import build_workload
from tests.helpers import Crash, CrashAfter, tiny_config

TOPK = ("strategy.name=fedavg", "strategy.uplink=[{name: topk, ratio: 0.1}]")


def final_params(run_dir: Path) -> bytes:
    return load_resume_point(run_dir).server["params"].tobytes()


def test_a_state_comes_back_bit_for_bit_and_a_newer_version_never_changes_an_older_one(tmp_path):
    store = ClientStateStore(open_store(tmp_path))
    first = {"residual": np.array([0.1, -0.0, np.inf, 3e-38], np.float32), "rounds": 1, "note": "x"}
    old = store.save(5, 1, first)
    new = store.save(5, 2, {"residual": np.arange(4, dtype=np.float32), "rounds": 2, "note": "y"})
    assert old.files() != new.files() and dict(old.values) == {"rounds": 1, "note": "x"}
    cold = ClientStateStore(store.location)  # another host: reads the files, not a cache
    back = cold.load(5, old)
    assert back["residual"].tobytes() == first["residual"].tobytes() and back["rounds"] == 1
    assert not back["residual"].flags.writeable  # strategies replace state arrays, never write into them
    assert cold.load(5, new)["residual"].tolist() == [0, 1, 2, 3]
    assert json.loads(json.dumps(old.to_json())) == old.to_json()
    assert StoredState.from_json(old.to_json(), 5) == old


def test_a_stored_state_naming_a_file_outside_the_store_or_of_another_client_is_refused(tmp_path):
    stored = ClientStateStore(open_store(tmp_path)).save(3, 1, {"r": np.zeros(2, np.float32)}).to_json()
    for name in ("../../etc/passwd", "c4-r1-0.npy"):
        stored["arrays"]["r"]["file"] = name
        with pytest.raises(ValueError, match="client 3's stored state is malformed"):
            StoredState.from_json(stored, 3)


def test_ten_thousand_topk_clients_keep_the_hosts_store_memory_within_its_bound(tmp_path):
    num_params, clients, cache_mb = 1000, 10_000, 0.5
    strategy = make_strategy("fedavg", {}, [{"name": "topk", "ratio": 0.1}], 0)
    strategy.setup_client(num_params)
    store = ClientStateStore(open_store(tmp_path), cache_mb=cache_mb)
    state_bytes = num_params * 4  # one float32 residual per client
    rng = np.random.default_rng(0)
    global_params, buffers = np.zeros(num_params, np.float32), np.zeros(0, np.float32)
    plan = RoundPlan(round=1, sync_mask=None, train_mask=None)
    records, kept = {}, {}
    for round_idx, trained in ((1, range(clients)), (2, range(0, clients, 10))):
        for cid in trained:
            state = store.load(cid, records[cid]) if cid in records else strategy.new_client_state(cid)
            local = rng.standard_normal(num_params).astype(np.float32)
            strategy.encode_upload(plan, global_params, local, buffers, 10, 0.5, state)
            records[cid] = store.save(cid, round_idx, state)
            assert store.cached_bytes <= cache_mb * 2**20
            if cid % 500 == 0:
                kept[cid] = state["residual"].copy()
    assert store.cached_bytes > (cache_mb * 2**20) - state_bytes  # the hot set is used, up to its bound
    assert len(list(Path(store.location.root).glob("c*.npy"))) == clients + clients // 10  # every state is on disk
    cold = ClientStateStore(store.location)
    for cid, residual in kept.items():  # evicted long ago: read back from disk, exactly
        assert cold.load(cid, records[cid])["residual"].tobytes() == residual.tobytes()
    assert all(isinstance(r, StoredState) and not any(isinstance(v, np.ndarray) for v in r.values.values())
               for r in records.values())  # what the engine keeps per client: names and digests only


def test_a_topk_run_keeps_no_state_arrays_in_the_engine_and_its_store_holds_what_its_checkpoints_name(tmp_path):
    cfg = tiny_config(*TOPK, "output.checkpoint_every=1", "output.keep_checkpoints=2", rounds=4)
    backend = InProcessBackend()
    run(cfg, tmp_path, backend=backend)
    engine = backend.engine
    assert engine.client_state and all(isinstance(s, StoredState) for s in engine.client_state.values())
    live = {n for s in engine.client_state.values() for n in s.files()}
    named = checkpointed_files(tmp_path)
    assert live <= named and len(list_checkpoints(tmp_path)) == 2
    collect_garbage(tmp_path, engine.location, live)
    on_disk = {p.name for p in Path(engine.location.root).glob("*.npy")}
    assert on_disk == named  # superseded versions went, every file a checkpoint names stayed


def test_a_damaged_state_file_makes_resume_fall_back_to_the_previous_checkpoint(tmp_path):
    run(tiny_config(*TOPK, "output.checkpoint_every=1", rounds=3), tmp_path)
    newest = load_resume_point(tmp_path)
    fresh = sorted(n for s in newest.stored.values() if s.round == 3 for n in s.files())
    (newest.store_root / fresh[0]).write_bytes(b"\x93NUMPY garbage")
    point = load_resume_point(tmp_path)
    assert point.round == 2
    [(path, reason)] = point.skipped
    assert path.name == "round-00000003" and fresh[0] in reason and "checksum" in reason
    (newest.store_root / fresh[0]).unlink()
    assert "is missing" in load_resume_point(tmp_path).skipped[0][1]


class ShippingBackend(EngineBackend):
    """Trains every client in-process, but as a host that cannot see the store: states travel whole."""

    name = "shipping"

    def executor(self, cfg, workload) -> ClientExecutor:
        host = InProcessBackend().executor(cfg, workload).host

        class Shipping(HostExecutor):
            def execute(self, broadcast: Broadcast, calls: list[ClientCall]) -> tuple[list[ClientResult], dict]:
                return super().execute(broadcast, ClientStateStore(broadcast.client_store).ship(calls))

        return Shipping(host)


def test_states_shipped_to_hosts_that_cannot_see_the_store_give_the_same_run_and_resume(tmp_path):
    cfg = tiny_config(*TOPK, "output.checkpoint_every=2", rounds=4)
    run(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "ship", backend=ShippingBackend(), callbacks=[CrashAfter(3)])
    run(cfg, tmp_path / "ship", backend=ShippingBackend(), resume=load_resume_point(tmp_path / "ship"))
    assert final_params(tmp_path / "ship") == final_params(tmp_path / "ref")


def test_a_host_that_cannot_see_the_store_returns_states_whole_and_refuses_a_stored_one(tmp_path):
    cfg = tiny_config(*TOPK)
    workload = build_workload(cfg)
    ds = workload.dataset
    host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
    host.add_clients(dict(enumerate(workload.partitions)))
    here = open_store(tmp_path)
    elsewhere = StoreLocation(here.root, "another run's token")
    plan = RoundPlan(round=1, sync_mask=None, train_mask=None)
    broadcast = Broadcast(1, workload.init_params, workload.init_buffers, plan, client_store=elsewhere)
    [whole] = host.run(broadcast, [(0, None)])
    assert whole.error is None and isinstance(whole.state, dict) and "residual" in whole.state
    stored = ClientStateStore(here).save(0, 1, whole.state)
    [refused] = host.run(broadcast, [(0, stored)])
    assert refused.upload is None and "which this host cannot see" in refused.error
    broadcast.client_store = here
    [written] = host.run(broadcast, [(0, stored)])
    assert isinstance(written.state, StoredState) and written.state.round == 1


def test_a_checkpoint_holding_states_themselves_resumes_into_the_store(tmp_path):
    """Checkpoints written before the store existed held each client's state inline ("clients")."""
    from apf_ray.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_config(*TOPK, "output.checkpoint_every=2", rounds=4)
    run(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "old", callbacks=[CrashAfter(3)])
    point = load_resume_point(tmp_path / "old")
    state = load_checkpoint(point.path)
    reader = ClientStateStore(open_store(tmp_path / "old"))
    state["clients"] = {str(c): {k: np.array(v) for k, v in reader.load(c, s).items()} for c, s in point.stored.items()}
    del state["client_store"]
    save_checkpoint(tmp_path / "old", point.round, state)
    for entry in Path(reader.location.root).glob("*.npy"):
        entry.unlink()
    legacy = load_resume_point(tmp_path / "old")
    assert legacy.clients and not legacy.stored
    run(cfg, tmp_path / "old", resume=legacy)
    assert final_params(tmp_path / "old") == final_params(tmp_path / "ref")
    assert json.loads((load_resume_point(tmp_path / "old").path / STATE_FILE).read_text())["client_store"]["clients"]


@pytest.mark.ray
def test_on_ray_actors_keep_topk_state_in_the_store_and_a_resumed_run_equals_the_in_process_one(local_ray, tmp_path):
    cfg = tiny_config(*TOPK, "output.checkpoint_every=2", rounds=4)
    run(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "ray", backend="ray", callbacks=[CrashAfter(3)])
    point = load_resume_point(tmp_path / "ray")
    assert point.round == 2 and point.stored and point.store_root == tmp_path.resolve() / "ray" / "client_state"
    run(cfg, tmp_path / "ray", backend="ray", resume=point)
    assert final_params(tmp_path / "ray") == final_params(tmp_path / "ref")
    ray_states, ref_states = (load_resume_point(tmp_path / name).stored for name in ("ray", "ref"))
    assert {c: dict(s.arrays) for c, s in ray_states.items()} == {c: dict(s.arrays) for c, s in ref_states.items()}


def test_a_copy_of_a_checkpoint_resumed_in_another_folder_brings_the_states_it_names_along(tmp_path):
    """As a Tune trial continues from another trial's checkpoint (PBT): the copy holds no state files."""
    cfg = tiny_config(*TOPK, "output.checkpoint_every=2", rounds=4)
    run(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "donor", callbacks=[CrashAfter(3)])
    copy = tmp_path / "tune" / "checkpoint_000002"
    shutil.copytree(load_resume_point(tmp_path / "donor").path, copy)
    point = read_resume_point(copy)
    assert point.store_root == (tmp_path / "donor" / "client_state").resolve()
    run(cfg, tmp_path / "trial", resume=point)
    assert final_params(tmp_path / "trial") == final_params(tmp_path / "ref")
    assert load_resume_point(tmp_path / "trial").store_root == (tmp_path / "trial" / "client_state").resolve()


def test_the_copy_handed_to_tune_carries_its_states_and_resumes_after_the_donors_store_is_gone(tmp_path):
    """What Tune is given (a PBT donor's checkpoint) must not depend on the donor's store, which the
    donor's next checkpoint may clean up or which may be on another node."""
    cfg = tiny_config(*TOPK, "output.checkpoint_every=2", rounds=4)
    run(cfg, tmp_path / "ref")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "donor", callbacks=[CrashAfter(3)])
    donor_checkpoint = load_resume_point(tmp_path / "donor").path
    staged = self_contained(donor_checkpoint, tmp_path / "staging" / donor_checkpoint.name)
    copy = tmp_path / "tune" / "checkpoint_000002"
    shutil.copytree(staged, copy)  # as Tune persists it
    shutil.rmtree(tmp_path / "staging")
    shutil.rmtree(tmp_path / "donor" / "client_state")
    point = read_resume_point(copy)
    assert point.stored and point.store_root == copy / "client_state"
    run(cfg, tmp_path / "trial", resume=point)
    assert final_params(tmp_path / "trial") == final_params(tmp_path / "ref")


@pytest.mark.ray
def test_on_ray_an_actor_that_cannot_see_the_store_gets_states_shipped_and_returns_them_whole(local_ray, tmp_path):
    import ray

    from actors.pools import ClientPools

    cfg = tiny_config(*TOPK, "cluster.pools=[{name: cpu, num_actors: 1, num_cpus: 0.5}]")
    workload = build_workload(cfg)
    ds, here = workload.dataset, open_store(tmp_path)
    host = ClientHost(cfg, ds.x_train, ds.y_train, ds.num_classes, ds.input_shape)
    host.add_clients(dict(enumerate(workload.partitions)))
    plan = RoundPlan(round=1, sync_mask=None, train_mask=None)
    rounds = [Broadcast(r, workload.init_params, workload.init_buffers, plan, client_store=here) for r in (1, 2)]
    [first] = host.run(rounds[0], [(0, None)])
    [second] = host.run(rounds[1], [(0, first.state)])  # the reference: read and written here
    # the pools' actor checks a token of another store: it does not see this one, as on another node
    pools = ClientPools(cfg, workload.pool_of_client, workload.partitions, ray.put(ds),
                        StoreLocation(here.root, "another node's store"))
    try:
        results, missing, partials = pools.execute(rounds[1], [(0, first.state)])  # no edge bounds: no partials
    finally:
        pools.shutdown()
    [shipped] = results
    assert not missing and not partials and shipped.error is None and isinstance(shipped.state, dict)
    assert shipped.state["residual"].tobytes() == ClientStateStore(here).load(0, second.state)["residual"].tobytes()
    assert shipped.upload.tobytes() == second.upload.tobytes()
