"""Aggregation on the way in (``apf_ray.edge``): each group of clients sends one partial, the server
never holds a round's K decoded uploads, and the result is the all-uploads path's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from apf_ray.aggregation import Partial, weighted_mean
from apf_ray.backends import InProcessBackend
from apf_ray.edge import check_round_memory, upload_bytes_on_server
from apf_ray.errors import SetupError
from apf_ray.metrics import read_history
from apf_ray.resume import load_resume_point
from apf_ray.run import run
from apf_ray.server import ServerCore
from apf_ray.workload import build_workload
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parent.parent
ONE_GROUP = "cluster.pools=[{name: cpu, num_actors: 1}]"
STRATEGIES = {  # (streamed, all uploads kept): the plug-ins override aggregate with the inherited one
    "apf": ("strategy.name=apf", "strategy.name=tests.plugins.all_uploads:AllUploadsAPF"),
    "gwpf": ("strategy.name=gwpf", "strategy.name=tests.plugins.all_uploads:AllUploadsGWPF"),
}
OPTIONS = {"apf": "strategy.options={threshold: 0.5, alpha: 0.5}",  # a new strategy.name drops tiny_config's
           "gwpf": "strategy.options={threshold: 0.02, thaw_threshold: 0.02}"}  # freezes and thaws in 6 rounds
CORRUPT = ("faults.corrupt_upload_prob=0.4", "faults.corrupt_kind=garbage", "cluster.min_clients=1")
CLIENT_FIELDS = ("round", "client_id", "status", "error", "bytes_up", "bytes_down", "num_samples", "train_loss")


def _clients(run_dir: Path) -> list[tuple]:
    return [tuple(row[k] for k in CLIENT_FIELDS) for row in pq.read_table(run_dir / "clients.parquet").to_pylist()]


# ---- the arithmetic -------------------------------------------------------------------------------
def test_a_partial_of_uploads_in_order_is_their_one_pass_weighted_mean_bit_for_bit():
    rng = np.random.default_rng(3)
    n = 100_003  # several blocks of a partial's in-place sums, the last one short
    masks = [rng.random(n) < 0.7 for _ in range(4)]
    vectors = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    weights = [13, 7, 40, 2]
    # same mask for all: the compact values
    partial = Partial()
    for v, w in zip(vectors, weights, strict=True):
        partial.add(v[masks[0]], masks[0], v[:3], w)
    mean, buffers = partial.mean()
    assert mean.tobytes() == weighted_mean([v[masks[0]] for v in vectors], weights).tobytes()
    assert buffers.tobytes() == weighted_mean([v[:3] for v in vectors], weights).tobytes()
    # per-client masks: over their union, each upload adding +0.0 where it sent nothing
    partial = Partial()
    for v, m, w in zip(vectors, masks, weights, strict=True):
        partial.add(v[m], m, np.zeros(0, np.float32), w)
    union = np.logical_or.reduce(masks)
    dense = [np.where(m, v, np.float32(0.0)) for v, m in zip(vectors, masks, strict=True)]
    assert np.array_equal(partial.sync_mask, union)
    assert partial.mean()[0].tobytes() == weighted_mean([d[union] for d in dense], weights).tobytes()
    # two groups merged: another summation order, equal to float rounding
    first, second = Partial(), Partial()
    for i, (v, m, w) in enumerate(zip(vectors, masks, weights, strict=True)):
        (first if i % 2 == 0 else second).add(v[m], m, np.zeros(0, np.float32), w)
    merged = Partial()
    merged.merge(first)
    merged.merge(second)
    assert merged.count == 4 and merged.weight == sum(weights)
    np.testing.assert_allclose(merged.mean()[0], partial.mean()[0], rtol=1e-6, atol=1e-7)


# ---- whole runs, in-process -----------------------------------------------------------------------
@pytest.mark.parametrize(("strategy", "faults"), [("apf", ()), ("apf", CORRUPT), ("gwpf", ())],
                         ids=["apf", "apf-corrupt-uploads", "gwpf"])
def test_streamed_run_equals_the_all_uploads_run_bit_for_bit_with_one_group(tmp_path, strategy, faults):
    # The same arithmetic twice: summed at the edge (one group) vs every upload decoded and kept on the
    # server. Garbage uploads are rejected at the edge with the reason and bytes the server would record,
    # and never touch the model; GWPF's thaw votes are tallied on the way in as the server counted them.
    rounds = 6
    for name, path in zip(STRATEGIES[strategy], ("edge", "all"), strict=True):
        run(tiny_config(ONE_GROUP, name, OPTIONS[strategy], *faults, "output.tensorboard=false", rounds=rounds),
            tmp_path / path)
    edge, everything = load_resume_point(tmp_path / "edge"), load_resume_point(tmp_path / "all")
    assert edge.round == rounds
    assert edge.server["params"].tobytes() == everything.server["params"].tobytes()
    assert edge.server["buffers"].tobytes() == everything.server["buffers"].tobytes()
    for key, value in edge.server["strategy"].items():  # APF's controller, GWPF's significance and mask
        if isinstance(value, np.ndarray):
            assert value.tobytes() == everything.server["strategy"][key].tobytes(), key
    assert _clients(tmp_path / "edge") == _clients(tmp_path / "all")
    statuses = {row[2] for row in _clients(tmp_path / "edge")}
    assert statuses == ({"ok", "rejected"} if faults else {"ok"})
    frozen = [r.frozen_fraction for r in read_history(tmp_path / "edge")]
    assert max(frozen) > 0 and (strategy != "gwpf" or frozen[-1] < max(frozen)), frozen  # froze (GWPF: thawed)


def test_every_pool_layout_gives_the_same_model_to_float_tolerance(tmp_path):
    for actors in (1, 3):
        cfg = tiny_config("strategy.name=fedavg", f"cluster.pools=[{{name: cpu, num_actors: {actors}}}]",
                          "output.tensorboard=false", rounds=3)
        run(cfg, tmp_path / str(actors))
    one, three = load_resume_point(tmp_path / "1"), load_resume_point(tmp_path / "3")
    np.testing.assert_allclose(three.server["params"], one.server["params"], rtol=1e-5, atol=1e-6)
    assert _clients(tmp_path / "1") == _clients(tmp_path / "3")


def test_the_server_gets_one_partial_per_actor_and_no_upload():
    cfg = tiny_config()  # one pool of 2 actors; 3 clients per round
    workload = build_workload(cfg)
    server = ServerCore(cfg, workload)
    executor = InProcessBackend().executor(cfg, workload)
    broadcast, clients = server.begin_round()
    assert broadcast.edge_bounds == (server.validator.norm_bound(server.params),
                                     server.validator.buffer_bound(server.buffers))
    results, missing, partials = executor.execute(broadcast, [(c, None) for c in clients])
    assert not missing and len(partials) == 2  # clients [c0, c2] and [c1]: the Ray actors' shares
    assert [p.count for p in partials] == [2, 1]
    assert all(r.upload is None and r.verdict.status == "ok" for r in results)
    assert sum(p.weight for p in partials) == sum(r.verdict.num_samples for r in results)


def test_robust_aggregation_still_sees_every_upload():
    cfg = tiny_config("defence.aggregation=median", "train.clients_per_round=5")
    workload = build_workload(cfg)
    server = ServerCore(cfg, workload)
    executor = InProcessBackend().executor(cfg, workload)
    seen: list[int] = []
    consensus = server.consensus

    def counting(uploads):
        seen.append(sum(u.values is not None for u in uploads))
        return consensus(uploads)

    server.consensus = counting
    broadcast, clients = server.begin_round()
    assert broadcast.edge_bounds is None  # nothing is summed on the way in
    results, missing, partials = executor.execute(broadcast, [(c, None) for c in clients])
    assert partials == [] and all(r.upload is not None for r in results)
    record, _ = server.finish_round(broadcast, clients, results, missing, server.downlink_bytes(broadcast, clients))
    assert record.aggregated and seen == [5]


# ---- the up-front memory refusal ------------------------------------------------------------------
def test_a_round_of_kept_uploads_that_cannot_fit_is_refused_up_front(tmp_path):
    cfg = tiny_config("defence.aggregation=median", "cluster.server_memory_gb=0.0015", rounds=1)
    per_upload = upload_bytes_on_server(cfg, 61706, 0)
    assert 1.5e6 // per_upload == 1  # so 3 clients per round do not fit, 1 does
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "apf_ray.cli", "train", "--inprocess", "--quiet", "--config",
                           str(tmp_path / "c.yaml"), "--output", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "defence.aggregation=median" in lines[0] and "train.clients_per_round ≤ 1 fits" in lines[0], lines[0]
    assert not out.exists()
    # a strategy that reads every upload is checked too; a streamed round holds no uploads, so it fits
    plugin = "tests.plugins.median_strategy:Median"  # overrides aggregate
    with pytest.raises(SetupError, match=f"strategy {plugin} reads every upload"):
        check_round_memory(tiny_config(f"strategy.name={plugin}"), 61706, 0, available=10**6)
    for streamed in ("strategy.name=apf", "strategy.name=gwpf"):  # GWPF's votes are tallied on the way in
        check_round_memory(tiny_config(streamed), 61706, 0, available=10**6)
