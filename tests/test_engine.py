"""The round engine and the callbacks' lifecycle: one assembly of the server side for every
backend, ``on_exception``/``on_end`` when a round raises, callback state in the checkpoint."""

from __future__ import annotations

import ast
import copy
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from apf_ray import engine as engine_module
from apf_ray.backends import EngineBackend, HostExecutor, InProcessBackend
from apf_ray.callbacks import Callback, RunView, outcome
from apf_ray.checkpoint import CheckpointWriter, load_checkpoint
from apf_ray.errors import SetupError
from apf_ray.outputs import recorded
from apf_ray.resume import load_resume_point
from apf_ray.run import run
from apf_ray.workload import build_workload
from tests.helpers import Crash, CrashAfter, tiny_config

REPO = Path(__file__).resolve().parent.parent


class Recorder(Callback):
    """Writes down every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.summary: dict | None = None
        self.error: BaseException | None = None

    def on_start(self, view: RunView) -> None:
        self.calls.append(f"start {view.start_round}")

    def on_round(self, event) -> None:
        self.calls.append(f"round {event.record.round}")

    def on_exception(self, err: BaseException) -> None:
        self.calls.append(f"exception {type(err).__name__}")
        self.error = err

    def on_end(self, summary: dict) -> None:
        self.calls.append(f"end {outcome(summary)}")
        self.summary = summary


class FailingExecutor(HostExecutor):
    """Trains like the in-process backend, then fails for real in round ``fail_round``."""

    fail_round = 2

    def execute(self, broadcast, calls):
        if broadcast.round == self.fail_round:
            raise OSError(f"the executor lost its clients in round {broadcast.round}")
        return super().execute(broadcast, calls)


class FailingBackend(InProcessBackend):
    """A user's backend: the in-process one with an executor that fails in round 2."""

    def executor(self, cfg, workload):
        return FailingExecutor(super().executor(cfg, workload).host)


class Follower(Callback):
    """Keeps state: the global model's sum after every round it saw, read through the run view."""

    def __init__(self) -> None:
        self.sums: list[float] = []

    def state_dict(self) -> dict:
        return {"sums": list(self.sums)}

    def load_state_dict(self, state: dict) -> None:
        self.sums = list(state["sums"])

    def on_start(self, view: RunView) -> None:
        self.view = view

    def on_round(self, event) -> None:
        self.sums.append(float(self.view.global_params().astype(np.float64).sum()))


def test_a_round_that_raises_runs_on_exception_then_on_end_and_the_error_reaches_the_caller(tmp_path):
    recorder = Recorder()
    with pytest.raises(OSError, match="lost its clients in round 2"):
        run(tiny_config(rounds=4), tmp_path / "r", backend=FailingBackend(), callbacks=[recorder])
    assert recorder.calls == ["start 0", "round 1", "exception OSError", "end failed"]
    assert isinstance(recorder.error, OSError)
    assert recorder.summary["failed"]["round"] == 1 and "lost its clients" in recorder.summary["failed"]["error"]
    assert recorder.summary["rounds"] == 1
    assert not (tmp_path / "r" / "summary.json").exists()  # a failed run writes no summary: it did not finish
    rounds = (tmp_path / "r" / "journal" / "rounds.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in rounds] == [1]


def test_a_callback_that_raises_reaches_every_callbacks_on_exception_and_on_end(tmp_path):
    before, after = Recorder(), Recorder()
    with pytest.raises(Crash):
        run(tiny_config("output.tensorboard=false", rounds=4), tmp_path / "r", callbacks=[before, CrashAfter(2), after])
    assert before.calls == ["start 0", "round 1", "round 2", "exception Crash", "end failed"]
    assert after.calls == ["start 0", "round 1", "exception Crash", "end failed"]  # round 2 never reached it
    assert after.summary["failed"]["round"] == 2


def test_on_end_runs_after_a_finished_run_with_its_summary(tmp_path):
    recorder = Recorder()
    summary = run(tiny_config("output.tensorboard=false", rounds=2), tmp_path / "r", callbacks=[recorder])
    assert recorder.calls == ["start 0", "round 1", "round 2", "end finished"]
    assert recorder.summary == summary and outcome(summary) == "finished"


def test_callback_state_survives_a_checkpoint_and_a_resume(tmp_path):
    cfg = tiny_config("output.tensorboard=false", "output.checkpoint_every=2", rounds=4)
    whole = Follower()
    run(cfg, tmp_path / "whole", callbacks=[whole])
    assert len(whole.sums) == 4 and len(set(whole.sums)) == 4  # the model moved every round
    assert load_resume_point(tmp_path / "whole").callbacks == {"Follower": {"sums": whole.sums}}

    first = Follower()
    with pytest.raises(Crash):  # after round 3: the newest checkpoint is round 2's
        run(cfg, tmp_path / "cut", callbacks=[first, CrashAfter(3)])
    point = load_resume_point(tmp_path / "cut")
    assert point.round == 2 and point.callbacks == {"Follower": {"sums": whole.sums[:2]}}
    resumed = Follower()
    run(cfg, tmp_path / "cut", callbacks=[resumed], resume=point)
    assert resumed.sums == whole.sums


def test_a_stateful_callback_cannot_resume_a_run_it_did_not_follow(tmp_path):
    cfg = tiny_config("output.tensorboard=false", rounds=2)
    run(cfg, tmp_path / "r")
    before = sorted(p.name for p in (tmp_path / "r").rglob("*"))
    with pytest.raises(SetupError, match=r"holds no state of the callback\(s\) Follower"):
        run(tiny_config("output.tensorboard=false", rounds=3), tmp_path / "r", callbacks=[Follower()],
            resume=load_resume_point(tmp_path / "r"))
    assert sorted(p.name for p in (tmp_path / "r").rglob("*")) == before


def test_a_resume_point_is_checked_against_the_workload_without_a_server(tmp_path):
    from apf_ray.resume import check_resume
    from apf_ray.workload import build_workload

    cfg = tiny_config("output.tensorboard=false", rounds=2)
    run(cfg, tmp_path / "r")
    point, workload = load_resume_point(tmp_path / "r"), build_workload(cfg)
    check_resume(cfg, point, workload)  # its own run's checkpoint fits
    point.server["buffers"] = np.append(point.server["buffers"], np.float32(0))
    with pytest.raises(SetupError, match=r"does not fit the configured run: checkpoint holds \d+ buffer values"):
        check_resume(cfg, point, workload)


def test_two_stateful_callbacks_need_two_state_keys(tmp_path):
    with pytest.raises(SetupError, match="two callbacks keep state under the key 'Follower'"):
        run(tiny_config(rounds=1), tmp_path / "r", callbacks=[Follower(), Follower()])
    assert not (tmp_path / "r").exists()


def test_a_backend_that_only_supplies_an_executor_runs_the_same_run(tmp_path):
    class MyBackend(EngineBackend):
        name = "mine"

        def executor(self, cfg, workload):
            return InProcessBackend().executor(cfg, workload)

    cfg = tiny_config("output.tensorboard=false", "strategy.uplink=[topk]", rounds=3)
    mine = run(cfg, tmp_path / "mine", backend=MyBackend())
    reference = run(cfg, tmp_path / "ref")
    assert (load_resume_point(tmp_path / "mine").server["params"].tobytes()
            == load_resume_point(tmp_path / "ref").server["params"].tobytes())
    same = ("final_accuracy", "bytes_up", "bytes_down", "frozen_fraction_final", "rounds")  # not measured times
    assert [mine[k] for k in same] == [reference[k] for k in same]


def _constructions(name: str) -> set[str]:
    """Source files (outside tests) that call ``name(...)``."""
    where = set()
    for path in [*REPO.glob("apf_ray/**/*.py"), *REPO.glob("actors/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                where.add(str(path.relative_to(REPO)))
    return where


def test_the_round_engine_is_the_one_assembly_of_the_server_side():
    assert _constructions("ServerCore") == {"apf_ray/engine.py"}
    assert _constructions("RoundEngine") == {"apf_ray/backends.py", "actors/server.py"}  # both backends
    assert _constructions("save_run_checkpoint") == {"apf_ray/engine.py"}


@pytest.mark.ray
def test_on_ray_the_view_reads_the_server_actor_and_callback_state_survives_a_resume(local_ray, tmp_path):
    cfg = tiny_config("output.tensorboard=false", "output.checkpoint_every=2", rounds=4)
    reference = Follower()
    run(cfg, tmp_path / "ref", callbacks=[reference])
    with pytest.raises(Crash):
        run(cfg, tmp_path / "ray", backend="ray", callbacks=[Follower(), CrashAfter(3)])
    resumed = Follower()
    run(cfg, tmp_path / "ray", backend="ray", callbacks=[resumed], resume=load_resume_point(tmp_path / "ray"))
    np.testing.assert_allclose(resumed.sums, reference.sums, rtol=1e-6)


def _assert_equal(got, want, where: str) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_equal(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), where
    else:
        assert got == want, where


class SeesWrittenCheckpoints(Callback):
    """Like Tune's reporter: reads each checkpoint's folder in ``on_round``."""

    needs_written_checkpoints = True

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_round(self, event) -> None:
        if event.checkpoint is not None:
            assert (event.checkpoint / "MANIFEST.json").is_file(), event.checkpoint
            self.seen.append(event.record.round)


def test_background_checkpoints_equal_written_ones_and_a_callback_that_reads_them_gets_them_written(tmp_path):
    cfg = tiny_config("output.checkpoint_every=1", "output.keep_checkpoints=10", rounds=3)
    run(cfg, tmp_path / "background")  # checkpoints written while the next round trains
    reader = SeesWrittenCheckpoints()
    run(cfg, tmp_path / "written", callbacks=[reader])
    assert reader.seen == [1, 2, 3]
    for r in (1, 2, 3):  # the same as the checkpoints written before the round's callbacks went on
        got, want = (load_checkpoint(tmp_path / run_name / "checkpoints" / f"round-{r:08d}")
                     for run_name in ("background", "written"))
        for state in (got, want):  # simulated seconds include measured compute time; each run has its store
            state["server"].pop("cum_simulated_s")
            state["client_store"].pop("root")
        _assert_equal(got, want, f"round {r}")
    assert load_resume_point(tmp_path / "background").round == 3
    assert "checkpoints/round-00000002/arrays.npz" in recorded(tmp_path / "background")  # --overwrite knows them


def test_an_engine_checkpoint_written_in_the_background_is_on_disk_once_finished(tmp_path, monkeypatch):
    next_round_done = threading.Event()
    real_fsync, real_staged = engine_module.fsync_files, CheckpointWriter._staged

    def slow_copy(writer, arrays):  # round 2's clients are done by now; their round must wait for it
        time.sleep(1.0)
        return real_staged(writer, arrays)

    def fsync_after_the_next_round(*args):  # the write's step after the copy: held until round 2 has run
        assert next_round_done.wait(timeout=120)
        real_fsync(*args)

    monkeypatch.setattr(CheckpointWriter, "_staged", slow_copy)
    monkeypatch.setattr(engine_module, "fsync_files", fsync_after_the_next_round)
    be = InProcessBackend()
    cfg = tiny_config(rounds=2)
    be.start(cfg, tmp_path, build_workload(cfg), None)
    be.run_round()
    # state_dict() hands out the server's live arrays (the controller's change in place next round)
    at_round_1 = copy.deepcopy(be.engine.server.state_dict())
    path = be.save_checkpoint({}, background=True)
    be.run_round()  # the next round runs while the write goes on; the checkpoint keeps round 1
    next_round_done.set()
    be.finish_checkpoint()
    assert load_resume_point(tmp_path).round == 1 and path.name == "round-00000001"
    assert be.engine.finish_checkpoint() is None  # nothing left in flight
    _assert_equal(load_checkpoint(path)["server"], at_round_1, "round 1's checkpoint")
    live_ema = be.engine.server.state_dict()["strategy"]["controller"]["ema"]
    assert not np.array_equal(live_ema, at_round_1["strategy"]["controller"]["ema"])  # round 2 moved it
