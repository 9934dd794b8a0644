"""Checkpoints (``apf_ray.checkpoint``): exact round trips, atomic replacement, and loud,
code-free refusal of anything damaged or crafted. Every test writes real files under tmp_path.

"Crafted" checkpoints below have their manifest rewritten to match the tampered files, so
the loader's own checks — not the checksum — must catch them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import pickle
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from apf_ray import checkpoint as ckpt
from apf_ray.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)

ALLOWED_DTYPES = ["?", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", ">i4", ">f8"]


def _bits(value: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", value))[0]


def _assert_same(got: Any, want: Any, where: str = "state") -> None:
    """Equal in type and bits: floats by their IEEE bits, arrays by dtype, shape and bytes."""
    if isinstance(want, tuple):
        want = list(want)
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, float):
        assert _bits(got) == _bits(want), f"{where}: {got!r} != {want!r}"
    elif isinstance(want, np.ndarray):
        assert (got.dtype, got.shape) == (want.dtype, want.shape), where
        assert got.tobytes() == want.tobytes(), where
    elif isinstance(want, dict):
        assert list(got) == list(want), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where


def _rewrite_manifest(path: Path) -> None:
    """Make the manifest match the files as they are now (what an attacker would do)."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest))


def _spring(marker: str) -> None:
    """Runs only if an object array is unpickled: leaves ``marker`` behind."""
    Path(marker).touch()


class _Trap:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _spring, (str(self.marker),)


# --------------------------------------------------------------------------- round trips


def test_every_leaf_kind_round_trips_bit_exactly(tmp_path: Path) -> None:
    read_only = np.arange(6, dtype=np.float32)
    read_only.flags.writeable = False
    grid = np.arange(24, dtype=np.int64).reshape(4, 6)
    state = {
        "none": None,
        "bools": [True, False],
        "ints": [0, -1, 2**53, -(2**53), 2**127 + 12345, -(2**200) + 1],
        "floats": [-0.0, 0.0, math.nan, -math.nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308],
        "text": ["", "plain", "é ✓ \U0001f600", "\ud800"],
        "read_only": read_only,
        "strided": grid[::2, ::3],
        "fortran": np.asfortranarray(grid.astype(np.float64)),
        "zero_d": np.array(3.5, dtype=np.float16),
        "empty": np.zeros((0, 3), dtype=np.uint8),
        "nan_bits": np.array([np.nan, -np.nan, -0.0, np.inf], dtype=np.float64),
        "dtypes": [np.ones(3, dtype=d) for d in ALLOWED_DTYPES],
    }
    got = load_checkpoint(save_checkpoint(tmp_path, 1, state))
    _assert_same(got, state)
    assert got["fortran"].flags.f_contiguous
    assert got["read_only"].flags.writeable


def test_pcg64_state_round_trips_and_resumes_the_same_stream(tmp_path: Path) -> None:
    rng = np.random.Generator(np.random.PCG64(7))
    rng.random(3)
    save_checkpoint(tmp_path, 1, {"rng": rng.bit_generator.state})
    restored = np.random.Generator(np.random.PCG64())
    restored.bit_generator.state = load_latest(tmp_path).state["rng"]
    assert restored.bit_generator.state == rng.bit_generator.state
    np.testing.assert_array_equal(restored.random(5), rng.random(5))


def test_tuples_come_back_as_lists_and_numpy_scalars_as_python_scalars(tmp_path: Path) -> None:
    state = {"pair": (1, (2.5, "x")), "f32": np.float32(0.1), "u64": np.uint64(2**64 - 1), "flag": np.bool_(True)}
    got = load_checkpoint(save_checkpoint(tmp_path, 1, state))
    _assert_same(got, {"pair": [1, [2.5, "x"]], "f32": float(np.float32(0.1)), "u64": 2**64 - 1, "flag": True})


def test_keys_that_look_like_markers_round_trip(tmp_path: Path) -> None:
    state = {"$array": "a0", "$$float": {"$int": 1}, "$": [], "a$": 2}
    _assert_same(load_checkpoint(save_checkpoint(tmp_path, 1, state)), state)


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**130), 2**130),
    st.floats(),
    st.text(max_size=8),
    hnp.arrays(st.sampled_from(ALLOWED_DTYPES), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)),
)
_trees = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=6), children, max_size=4),
    ),
    max_leaves=12,
)
_example = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=st.dictionaries(st.text(max_size=6), _trees, max_size=5))
def test_random_nested_structures_round_trip(tmp_path: Path, state: dict[str, Any]) -> None:
    directory = tmp_path / f"example-{next(_example)}"
    _assert_same(load_checkpoint(save_checkpoint(directory, 3, state)), state)


# --------------------------------------------------------------------------- what save refuses


def test_non_str_key_is_a_type_error_naming_its_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state\['clients'\]\[0\]\[3\]: dict keys must be str, got int"):
        save_checkpoint(tmp_path, 1, {"clients": [{3: "held"}]})
    assert list_checkpoints(tmp_path) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.array([object()]), "dtype object"),
        (np.zeros(2, dtype=[("a", "f4")]), r"dtype \[\('a', '<f4'\)\]"),
        (np.zeros(2, dtype=np.complex64), "dtype complex64"),
        (np.ma.masked_array([1.0]), "ndarray subclass MaskedArray"),
        ({1, 2}, "type set"),
        (b"raw", "type bytes"),
    ],
)
def test_unsupported_values_are_refused_before_anything_is_written(tmp_path: Path, value: Any, message: str) -> None:
    with pytest.raises(TypeError, match=rf"state\['x'\]\[1\]: .*{message}"):
        save_checkpoint(tmp_path, 1, {"x": [0, value]})
    assert not (tmp_path / ckpt.SUBDIR).exists()


def test_circular_reference_is_refused(tmp_path: Path) -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match=r"state\['loop'\]\[0\]: circular reference"):
        save_checkpoint(tmp_path, 1, {"loop": loop})


# --------------------------------------------------------------------------- layout, replacement, pruning


def test_layout_is_a_round_directory_with_a_manifest_of_sizes_and_hashes(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 42, {"w": np.ones(10, dtype=np.float32)})
    assert path == tmp_path / "checkpoints" / "round-00000042"
    assert sorted(p.name for p in path.iterdir()) == ["MANIFEST.json", "arrays.npz", "state.json"]
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert (manifest["format"], manifest["version"], manifest["step"]) == ("apf-ray-checkpoint", 1, 42)
    for name in ("state.json", "arrays.npz"):
        data = (path / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    with zipfile.ZipFile(path / "arrays.npz") as zf:
        assert [(i.filename, i.compress_type) for i in zf.infolist()] == [("a0.npy", zipfile.ZIP_STORED)]


def test_keep_prunes_to_the_newest_checkpoints(tmp_path: Path) -> None:
    for step in range(10, 60, 10):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [40, 50]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-00000040", "round-00000050"]


def test_keep_never_removes_the_checkpoint_just_written(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 20, {})
    save_checkpoint(tmp_path, 30, {})
    save_checkpoint(tmp_path, 10, {}, keep=1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10, 30]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 5, {"v": 1, "a": np.zeros(3)})
    path = save_checkpoint(tmp_path, 5, {"v": 2})
    assert load_checkpoint(path) == {"v": 2}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-00000005"]


def test_replacing_works_where_the_os_cannot_exchange_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    save_checkpoint(tmp_path, 5, {"v": 1})
    path = save_checkpoint(tmp_path, 5, {"v": 2})
    assert load_checkpoint(path) == {"v": 2}
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-00000005"]


def test_leftover_temp_dir_is_ignored_and_cleaned_by_the_next_save(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, {"v": 10})
    leftover = tmp_path / "checkpoints" / ".tmp-round-00000020-deadbeef"
    leftover.mkdir()
    (leftover / "arrays.npz").write_bytes(b"half written")
    assert list_checkpoints(tmp_path) == [(10, tmp_path / "checkpoints" / "round-00000010")]
    assert load_latest(tmp_path).state == {"v": 10}
    save_checkpoint(tmp_path, 20, {"v": 20})
    assert not leftover.exists()


def test_list_checkpoints_ignores_names_that_are_not_checkpoints(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 7, {})
    root = tmp_path / "checkpoints"
    for name in ("round-7", "round-000000007", "round-0000000x", "notes"):
        (root / name).mkdir()
    (root / "round-00000008").write_text("a file, not a directory")
    assert list_checkpoints(tmp_path) == [(7, root / "round-00000007")]


# --------------------------------------------------------------------------- damaged checkpoints


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one_and_says_why(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 10, {"w": np.full(1000, 10.0)})
    newest = save_checkpoint(tmp_path, 20, {"w": np.full(1000, 20.0)})
    size = (newest / "arrays.npz").stat().st_size
    with (newest / "arrays.npz").open("r+b") as f:
        f.truncate(size // 2)
    loaded = load_latest(tmp_path)
    assert loaded.step == 10
    assert loaded.path == tmp_path / "checkpoints" / "round-00000010"
    np.testing.assert_array_equal(loaded.state["w"], np.full(1000, 10.0))
    assert loaded.skipped == [(newest, f"arrays.npz is truncated ({size // 2} of {size} bytes)")]


@pytest.mark.parametrize("name", ["state.json", "arrays.npz"])
def test_garbage_bytes_of_the_right_length_are_a_checksum_mismatch(tmp_path: Path, name: str) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": np.arange(100)})
    size = (path / name).stat().st_size
    (path / name).write_bytes(np.random.default_rng(0).bytes(size))
    with pytest.raises(CheckpointError, match=rf"round-00000001: checksum mismatch in {name}$"):
        load_checkpoint(path)


def test_garbage_manifest_is_not_valid_json(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {})
    (path / "MANIFEST.json").write_bytes(b"\x00\xff garbage")
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json is not valid JSON"):
        load_checkpoint(path)


def test_manifest_checksum_mismatch_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": np.arange(10)})
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["arrays.npz"]["sha256"] = "0" * 64
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"checksum mismatch in arrays\.npz$"):
        load_checkpoint(path)


def test_missing_file_is_reported_by_name(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {})
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"round-00000001: missing state\.json$"):
        load_checkpoint(path)


def test_load_latest_without_checkpoints_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        load_latest(tmp_path)


def test_load_latest_with_no_readable_checkpoint_lists_every_reason(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, 1, {})
    second = save_checkpoint(tmp_path, 2, {})
    (first / "MANIFEST.json").unlink()
    (second / "state.json").write_bytes(b"{} ")
    with pytest.raises(CheckpointError) as info:
        load_latest(tmp_path)
    assert info.value.reason == (
        "no readable checkpoint (round-00000002: state.json has 3 bytes, the manifest says 2; "
        "round-00000001: missing MANIFEST.json)"
    )


# --------------------------------------------------------------------------- crafted checkpoints


def test_pickled_object_array_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": np.zeros(3)})
    armed, marker = tmp_path / "armed", tmp_path / "marker"
    trap = np.array([_Trap(armed)], dtype=object)
    with (path / "arrays.npz").open("wb") as f:
        np.savez(f, a0=trap)
    np.load(path / "arrays.npz", allow_pickle=True)["a0"]
    assert armed.exists(), "the trap must fire when unpickled, or this test proves nothing"
    armed.unlink()
    trap[0].marker = marker
    with (path / "arrays.npz").open("wb") as f:
        np.savez(f, a0=trap)
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=r"arrays\.npz member a0\.npy has dtype object"):
        load_checkpoint(path)
    assert not marker.exists()


def test_array_of_a_disallowed_dtype_is_refused_on_load(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": np.zeros(3)})
    np.savez(path / "arrays.npz", a0=np.zeros(3, dtype=np.complex128))
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=r"a0\.npy has dtype complex128"):
        load_checkpoint(path)


def test_reference_to_a_missing_array_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {"w": np.zeros(3)})
    (path / "state.json").write_text('{"w": {"$array": "a0"}, "v": {"$array": "a9"}}')
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=r"references arrays missing from arrays.npz: \['a9.npy'\]"):
        load_checkpoint(path)


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {})
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["version"] = 2
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"unsupported format version 2 \(this apf-ray reads 1\)"):
        load_checkpoint(path)


def test_manifest_listing_an_unexpected_file_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {})
    manifest = json.loads((path / "MANIFEST.json").read_text())
    manifest["files"]["../../etc/passwd"] = manifest["files"]["state.json"]
    (path / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"lists unexpected files \['../../etc/passwd'\]"):
        load_checkpoint(path)


def test_state_json_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 1, {})
    (path / "state.json").write_bytes(b'{"x": NaN}')
    _rewrite_manifest(path)
    with pytest.raises(CheckpointError, match=r"state\.json is not valid JSON"):
        load_checkpoint(path)


def test_checkpoint_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(CheckpointError(Path("/runs/x/round-00000001"), "missing state.json")))
    assert (err.path, err.reason) == (Path("/runs/x/round-00000001"), "missing state.json")
    assert str(err) == "checkpoint /runs/x/round-00000001: missing state.json"


# ---- background writes ----------------------------------------------------------------------

def test_background_writes_equal_synchronous_ones_and_keep_prunes(tmp_path: Path) -> None:
    writer = ckpt.CheckpointWriter()
    states = {step: {"w": np.arange(step, step + 1000, dtype=np.float32), "step": step} for step in (1, 2, 3)}
    for step, state in states.items():
        assert writer.submit(tmp_path, step, state, keep=2) == tmp_path / "checkpoints" / f"round-{step:08d}"
    assert writer.wait() == tmp_path / "checkpoints" / "round-00000003"
    assert writer.wait() is None and not writer.busy
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 3]
    for step in (2, 3):
        _assert_same(load_checkpoint(tmp_path / "checkpoints" / f"round-{step:08d}"), states[step])
    with np.load(tmp_path / "checkpoints" / "round-00000003" / "arrays.npz") as npz:  # streamed zip, still an .npz
        np.testing.assert_array_equal(npz["a0"], states[3]["w"])


def test_copied_background_writes_reuse_their_buffers_and_each_checkpoint_keeps_its_own_values(tmp_path: Path) -> None:
    writer = ckpt.CheckpointWriter()
    live = {"w": np.zeros(200_000, np.float32), "b": np.arange(4, dtype=np.int64), "step": 0}
    buffers = []
    for step in (1, 2, 3):
        live["w"][:] = step
        live["step"] = step
        writer.submit(tmp_path, step, live, keep=3, copy=True)
        writer.wait_copied()  # the caller may change its arrays from here on, the write still in flight
        buffers.append(writer._staging["a0"])
        live["w"][:] = -1.0
    writer.wait()
    assert buffers[0] is buffers[1] is buffers[2], "one staging buffer per array, reused by the next checkpoint"
    for step in (1, 2, 3):
        loaded = load_checkpoint(tmp_path / "checkpoints" / f"round-{step:08d}")
        assert loaded["step"] == step and np.all(loaded["w"] == step)
        np.testing.assert_array_equal(loaded["b"], np.arange(4))


def test_a_copied_background_write_copies_first_and_the_caller_goes_on_while_it_writes(tmp_path: Path) -> None:
    writer = ckpt.CheckpointWriter()
    live = {"w": np.full(1000, 7.0, np.float32)}
    release = threading.Event()
    writer.submit(tmp_path, 1, live, copy=True, before_write=lambda: release.wait(timeout=60))
    writer.wait_copied()  # returns while the write itself is held
    assert writer.busy and not (tmp_path / "checkpoints" / "round-00000001").exists()
    live["w"][:] = -1.0
    release.set()
    assert writer.wait() == tmp_path / "checkpoints" / "round-00000001"
    assert np.all(load_checkpoint(tmp_path / "checkpoints" / "round-00000001")["w"] == 7.0)
    writer.wait_copied()  # nothing in flight: returns at once
    release.clear()
    writer.submit(tmp_path, 2, live, before_write=lambda: release.wait(timeout=60))  # no copy: it reads live
    waiter = threading.Thread(target=writer.wait_copied)
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive(), "without a copy, wait_copied lasts as long as the write"
    release.set()
    waiter.join(timeout=60)
    assert writer.wait() == tmp_path / "checkpoints" / "round-00000002"


def test_background_writer_refuses_a_bad_state_in_the_callers_thread(tmp_path: Path) -> None:
    writer = ckpt.CheckpointWriter()
    with pytest.raises(TypeError, match=r"state\['x'\]"):
        writer.submit(tmp_path, 1, {"x": {1: 2}})
    assert writer.wait() is None and not (tmp_path / "checkpoints").exists()


def test_a_failed_background_write_raises_from_wait(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    writer = ckpt.CheckpointWriter()
    writer.submit(not_a_folder, 1, {"w": np.zeros(3, np.float32)})
    with pytest.raises(OSError):
        writer.wait()


KILLED_WRITER = """
import sys, time
import numpy as np
from apf_ray.checkpoint import CheckpointWriter, save_checkpoint
save_checkpoint(sys.argv[1], 1, {"w": np.ones(4, np.float32)})
big = {f"a{i}": np.full(25_000_000, i, np.float32) for i in range(4)}  # 400 MB: long enough to be caught
CheckpointWriter().submit(sys.argv[1], 2, big)
print("submitted", flush=True)
time.sleep(600)
"""


def test_a_background_write_killed_midway_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "submitted"
        deadline = time.monotonic() + 60
        root = tmp_path / "checkpoints"
        while not any((p / "arrays.npz").exists() for p in root.glob(".tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert list(root.glob(".tmp-*")), "the write was not caught in flight"
    loaded = load_latest(tmp_path)
    assert loaded.path == root / "round-00000001"
    _assert_same(loaded.state, {"w": np.ones(4, np.float32)})
    save_checkpoint(tmp_path, 3, {})  # the next save clears what the killed write left
    assert not list(root.glob(".tmp-*"))
