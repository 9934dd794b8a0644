"""Crash-safe, code-free checkpoints: one directory per step, checksummed, never unpickled.

A single pickle file is the wrong shape for a long federated run: a crash mid-write or a
full disk leaves a truncated file and nothing to resume from, and ``pickle.load`` of a
crafted file runs arbitrary code on ``--resume``. Here a checkpoint is plain data — JSON for
the structure, ``.npy`` members of an uncompressed zip for the arrays — written to a
temporary directory, fsynced and renamed into place, and every byte is checked against a
SHA-256 manifest before anything is parsed. Older checkpoints are kept (``keep``), so a
damaged newest one costs ``checkpoint_every`` rounds, not the run.

On-disk layout (one writer per ``directory``)::

    directory/checkpoints/
        round-00000010/            step formatted as {step:08d} (more digits past 99 999 999)
            MANIFEST.json          {"format": "apf-ray-checkpoint", "version": 1, "step": 10,
                                    "files": {"state.json": {"size": B, "sha256": hex},
                                              "arrays.npz": {"size": B, "sha256": hex}}}
            state.json             the structure, ASCII JSON, arrays replaced by references
            arrays.npz             an .npz (stored, not deflated): members a0.npy, a1.npy, ...
        round-00000020/
        .tmp-...                   a write or a removal in progress (or interrupted by a crash):
                                   ignored by readers, deleted by the next save

What a state may hold, and what comes back:

- dicts with ``str`` keys (any other key is a TypeError naming its path, e.g.
  ``state['held_version'][3]``; convert first: ``{str(k): v for k, v in d.items()}`` and back
  with ``{int(k): v ...}``), lists and tuples (tuples come back as lists);
- None, bool, int of any size (exact: 128-bit PCG64 state words round-trip), float (bit-exact,
  including -0.0, ±inf and NaN payloads), str;
- numpy arrays of bool, int8..int64, uint8..uint64, float16/32/64 of any shape, order, byte
  order and writability; they come back as fresh writable arrays of the same dtype and shape
  (C- or Fortran-ordered as saved). Object, structured, complex, datetime and long-double
  arrays and ndarray subclasses are refused (TypeError) when saving and when loading;
- numpy scalars of those dtypes come back as Python ``bool``/``int``/``float`` (the value is
  exact, the numpy dtype is not kept; wrap in ``np.asarray`` to keep it as a 0-d array).

JSON encoding of the leaves that plain JSON cannot carry exactly: ``{"$float": "inf"}``,
``{"$float": "-inf"}``, ``{"$float": "nan:7ff8000000000000"}`` (the 64 IEEE bits), ints with
|x| ≥ 2**53 as ``{"$int": "0x..."}`` (so every JSON reader sees them exactly), arrays as
``{"$array": "a0"}``. A dict key that starts with ``$`` is stored with one more ``$``.

Reading executes no code: ``json.loads`` and ``numpy.lib.format.read_array(...,
allow_pickle=False)`` on each zip member, after the ``.npy`` header's dtype and byte count
were checked. Every failure to read is a :class:`CheckpointError` whose one-line message
names the checkpoint directory and the reason. Arrays are written straight from the
caller's buffers (no copy, non-contiguous ones in 256 KiB chunks) and hashed as they are
written (one pass: the zip is streamed with data descriptors, never re-read), and read with one
copy; verifying on load streams each file in 1 MiB chunks.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import math
import numbers
import os
import re
import shutil
import struct
import sys
import threading
import uuid
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

FORMAT: Final = "apf-ray-checkpoint"
VERSION: Final = 1
SUBDIR: Final = "checkpoints"
MANIFEST: Final = "MANIFEST.json"
STATE_FILE: Final = "state.json"
ARRAYS_FILE: Final = "arrays.npz"

_DATA_FILES: Final = (STATE_FILE, ARRAYS_FILE)
_NAME_RE: Final = re.compile(r"round-(\d{8,})")
_TMP_PREFIX: Final = ".tmp-"
_HASH_CHUNK: Final = 1 << 20  # bytes read per hash update
_MAX_MANIFEST_BYTES: Final = 1 << 16  # a real manifest is ~300 B
_MAX_NPY_HEADER: Final = 10_000  # numpy's own default limit, in bytes

_ARRAY: Final = "$array"
_FLOAT: Final = "$float"
_INT: Final = "$int"
_MARKER_PREFIX: Final = "$"
_JSON_EXACT_INT: Final = 2**53  # every JSON reader (IEEE doubles) holds |x| < 2**53 exactly
_HEX_INT_RE: Final = re.compile(r"-?0x[0-9a-f]+")
_NAN_RE: Final = re.compile(r"nan:([0-9a-f]{16})")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_FLOAT_BITS: Final = struct.Struct("<Q")
_DOUBLE: Final = struct.Struct("<d")

_ALLOWED_DTYPES: Final = "bool, int8..int64, uint8..uint64, float16..float64"

_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: ``path`` is its directory, ``reason`` one line."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type[CheckpointError], tuple[Path, str]]:
        return type(self), (self.path, self.reason)


class _Damaged(Exception):
    """Raised by the readers below with a reason; ``load_checkpoint`` adds the directory."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """The newest readable checkpoint and the newer ones passed over, with their reasons."""

    step: int
    state: dict[str, Any]
    path: Path
    skipped: list[tuple[Path, str]]


# --------------------------------------------------------------------------- encoding


def _allowed_dtype(dtype: np.dtype) -> bool:
    """One of ``_ALLOWED_DTYPES``, in either byte order."""
    return dtype.kind in "biuf" and dtype.itemsize <= 8


def _key_path(where: str, key: object) -> str:
    return f"{where}[{key!r}]"


def _escape(key: str) -> str:
    return _MARKER_PREFIX + key if key.startswith(_MARKER_PREFIX) else key


def _encode_float(value: float) -> float | dict[str, str]:
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return {_FLOAT: f"nan:{_FLOAT_BITS.unpack(_DOUBLE.pack(value))[0]:016x}"}
    return {_FLOAT: "inf" if value > 0 else "-inf"}


def _encode(value: Any, where: str, arrays: dict[str, np.ndarray], open_ids: set[int]) -> Any:
    """JSON-ready tree of ``value``; arrays are collected in ``arrays`` (by reference, no copy)."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, (int, np.integer)):
        number = int(value)
        return number if abs(number) < _JSON_EXACT_INT else {_INT: hex(number)}
    if isinstance(value, (float, np.floating)):
        if isinstance(value, np.floating) and value.dtype.itemsize > 8:
            raise TypeError(f"{where}: numpy {value.dtype} scalars are not supported (float64 at most)")
        return _encode_float(float(value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, np.ndarray):
        if type(value) is not np.ndarray:
            raise TypeError(f"{where}: ndarray subclass {type(value).__name__} is not supported; pass np.asarray(x)")
        if not _allowed_dtype(value.dtype):
            raise TypeError(f"{where}: arrays of dtype {value.dtype} are not supported (allowed: {_ALLOWED_DTYPES})")
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {_ARRAY: name}
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in open_ids:
            raise ValueError(f"{where}: circular reference")
        open_ids.add(id(value))
        if isinstance(value, Mapping):
            tree: Any = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(
                        f"{_key_path(where, key)}: dict keys must be str, got {type(key).__name__} "
                        "(convert them, e.g. {str(k): v for k, v in d.items()})"
                    )
                tree[_escape(key)] = _encode(item, _key_path(where, key), arrays, open_ids)
        else:
            tree = [_encode(item, f"{where}[{i}]", arrays, open_ids) for i, item in enumerate(value)]
        open_ids.remove(id(value))
        return tree
    raise TypeError(f"{where}: values of type {type(value).__name__} are not supported")


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _ArrayRef:
    """Where ``state.json`` refers to a member of ``arrays.npz``; replaced once that is read."""

    name: str


_Slot = tuple[dict[str, Any] | list[Any], Any, str]  # (container, key or index, array name)


def _decode_marker(key: str, payload: Any, where: str) -> Any:
    if key == _ARRAY and isinstance(payload, str):
        return _ArrayRef(payload)
    if key == _FLOAT and isinstance(payload, str):
        if payload in ("inf", "-inf"):
            return float(payload)
        match = _NAN_RE.fullmatch(payload)
        if match:
            value = _DOUBLE.unpack(_FLOAT_BITS.pack(int(match.group(1), 16)))[0]
            if math.isnan(value):
                return value
    if key == _INT and isinstance(payload, str) and _HEX_INT_RE.fullmatch(payload):
        return int(payload, 16)
    raise _Damaged(f"{STATE_FILE}: {where} holds an invalid {key} value {payload!r}")


def _decode(node: Any, where: str, slots: list[_Slot]) -> Any:
    """Python tree of a parsed ``state.json``; each array reference is recorded in ``slots``."""
    if isinstance(node, list):
        items: list[Any] = []
        for i, item in enumerate(node):
            value = _decode(item, f"{where}[{i}]", slots)
            if isinstance(value, _ArrayRef):
                slots.append((items, i, value.name))
            items.append(value)
        return items
    if not isinstance(node, dict):
        return node  # None, bool, int, float, str: json.loads produces nothing else
    markers = [key for key in node if key.startswith(_MARKER_PREFIX) and not key.startswith(2 * _MARKER_PREFIX)]
    if markers:
        if len(node) != 1 or markers[0] not in (_ARRAY, _FLOAT, _INT):
            raise _Damaged(f"{STATE_FILE}: {where} holds unknown marker keys {sorted(markers)}")
        return _decode_marker(markers[0], node[markers[0]], where)
    decoded: dict[str, Any] = {}
    for stored, item in node.items():
        key = stored[1:] if stored.startswith(_MARKER_PREFIX) else stored
        value = _decode(item, _key_path(where, key), slots)
        if isinstance(value, _ArrayRef):
            slots.append((decoded, key, value.name))
        decoded[key] = value
    return decoded


# --------------------------------------------------------------------------- files


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a read-only descriptor of either), so its data or its entries are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class HashingWriter:
    """A write-only stream that hashes and counts what passes through it (one pass, no re-read).

    It answers ``tell`` but refuses ``seek``, so :mod:`zipfile` streams each member and puts
    its sizes in a data descriptor after the data instead of seeking back to patch the local
    header: every byte is written once, in order, and hashed as it goes.
    """

    def __init__(self, file: Any) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0  # bytes written

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.file.write(view)
        self.digest.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def seek(self, *args: Any) -> int:
        raise OSError(errno.ESPIPE, "a hashing stream cannot seek")

    def flush(self) -> None:
        self.file.flush()


def sha256_file(path: Path) -> str:
    """The SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while count := f.readinto(buf):
            digest.update(view[:count])
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """Linux ``renameat2`` from libc, or None where there is none (other OSes, old glibc)."""
    if sys.platform != "linux":
        return None
    func = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if func is not None:
        func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories; False where the OS or filesystem cannot."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _temp_name(root: Path, what: str) -> Path:
    return root / f"{_TMP_PREFIX}{what}-{uuid.uuid4().hex}"


def _move_into_place(src: Path, dst: Path, root: Path) -> None:
    """Rename the finished ``src`` to ``dst``, replacing an existing ``dst`` atomically if possible.

    Without ``renameat2(RENAME_EXCHANGE)`` the old ``dst`` is first renamed aside; a crash
    between the two renames then loses this step and readers fall back to the previous one.
    """
    try:
        os.rename(src, dst)
        return
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if _exchange(src, dst):
        shutil.rmtree(src)  # now the old checkpoint
        return
    old = _temp_name(root, f"old-{dst.name}")
    os.rename(dst, old)
    os.rename(src, dst)
    shutil.rmtree(old)


# --------------------------------------------------------------------------- reading


def _read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table, after checking format, version and step."""
    try:
        with (path / MANIFEST).open("rb") as f:
            raw = f.read(_MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise _Damaged(f"missing {MANIFEST}") from None
    except OSError as err:
        raise _Damaged(f"cannot read {MANIFEST} ({err.strerror})") from None
    if len(raw) > _MAX_MANIFEST_BYTES:
        raise _Damaged(f"{MANIFEST} is over {_MAX_MANIFEST_BYTES} bytes, not a manifest")
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise _Damaged(f"{MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise _Damaged(f"{MANIFEST} is not an apf-ray checkpoint manifest (format {found!r})")
    if manifest.get("version") != VERSION:
        raise _Damaged(f"unsupported format version {manifest.get('version')!r} (this apf-ray reads {VERSION})")
    step = manifest.get("step")
    match = _NAME_RE.fullmatch(path.name)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise _Damaged(f"{MANIFEST} has an invalid step {step!r}")
    if match and int(match.group(1)) != step:
        raise _Damaged(f"{MANIFEST} says step {step}, the directory name says {int(match.group(1))}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _Damaged(f"{MANIFEST} has no file table")
    unexpected = sorted(set(files) - set(_DATA_FILES))
    if unexpected:
        raise _Damaged(f"{MANIFEST} lists unexpected files {unexpected}")
    for name in _DATA_FILES:
        entry = files.get(name)
        if entry is None:
            raise _Damaged(f"{MANIFEST} does not list {name}")
        size, sha = (entry.get("size"), entry.get("sha256")) if isinstance(entry, dict) else (None, None)
        if (
            isinstance(size, bool)
            or not isinstance(size, int)
            or size < 0
            or not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha))
        ):
            raise _Damaged(f"{MANIFEST} has an invalid entry for {name}: {entry!r}")
    return files


def _check_size(name: str, actual: int, expected: int) -> None:
    if actual < expected:
        raise _Damaged(f"{name} is truncated ({actual} of {expected} bytes)")
    if actual > expected:
        raise _Damaged(f"{name} has {actual} bytes, the manifest says {expected}")


def _read_verified(path: Path, files: dict[str, dict[str, Any]]) -> bytes:
    """Check both data files' sizes, then hashes, against the manifest; return state.json's bytes."""
    try:
        for name in _DATA_FILES:
            _check_size(name, (path / name).stat().st_size, files[name]["size"])
        state_bytes = (path / STATE_FILE).read_bytes()
        _check_size(STATE_FILE, len(state_bytes), files[STATE_FILE]["size"])
        if hashlib.sha256(state_bytes).hexdigest() != files[STATE_FILE]["sha256"]:
            raise _Damaged(f"checksum mismatch in {STATE_FILE}")
        if sha256_file(path / ARRAYS_FILE) != files[ARRAYS_FILE]["sha256"]:
            raise _Damaged(f"checksum mismatch in {ARRAYS_FILE}")
    except FileNotFoundError as err:
        raise _Damaged(f"missing {Path(err.filename).name}") from None
    except OSError as err:
        raise _Damaged(f"cannot read {Path(err.filename or path).name} ({err.strerror})") from None
    return state_bytes


def _reject_constant(name: str) -> None:
    raise ValueError(f"non-standard JSON constant {name}")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One ``.npy`` member: header checked (version, dtype, byte count) before any data is read."""
    where = f"{ARRAYS_FILE} member {info.filename}"
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Damaged(f"{where} is compressed; checkpoints store arrays uncompressed")
    with zf.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp, max_header_size=_MAX_NPY_HEADER)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp, max_header_size=_MAX_NPY_HEADER)
        else:
            raise _Damaged(f"{where} has unsupported .npy version {version}")
        data_bytes = info.file_size - fp.tell()
    if not _allowed_dtype(dtype):
        raise _Damaged(f"{where} has dtype {dtype}, not one of {_ALLOWED_DTYPES}")
    if math.prod(shape) * dtype.itemsize != data_bytes:
        raise _Damaged(
            f"{where} holds {data_bytes} data bytes, its header {shape} {dtype} needs "
            f"{math.prod(shape) * dtype.itemsize}"
        )
    with zf.open(info) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False, max_header_size=_MAX_NPY_HEADER)


def _read_arrays(path: Path, names: set[str]) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path / ARRAYS_FILE) as zf:
        members = {info.filename: info for info in zf.infolist()}
        expected = {f"{name}.npy" for name in names}
        missing, extra = sorted(expected - set(members)), sorted(set(members) - expected)
        if missing:
            raise _Damaged(f"{STATE_FILE} references arrays missing from {ARRAYS_FILE}: {missing}")
        if extra:
            raise _Damaged(f"{ARRAYS_FILE} holds unreferenced members {extra}")
        return {name: _read_member(zf, members[f"{name}.npy"]) for name in names}


# --------------------------------------------------------------------------- public API


CHECKPOINT_FILES: Final = (MANIFEST, STATE_FILE, ARRAYS_FILE)
"""What a checkpoint folder holds once written (known before a background write ends)."""


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every directory named like a checkpoint, oldest first; none are read."""
    root = Path(directory) / SUBDIR
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _NAME_RE.fullmatch(entry.name)
        if match and entry.name == f"round-{int(match.group(1)):08d}" and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_checkpoint(directory: Path, step: int, state: Mapping[str, Any], *, keep: int = 3) -> Path:
    """Durably write ``state`` as ``directory/checkpoints/round-{step:08d}`` and return that path.

    An existing checkpoint of the same step is replaced. Afterwards only the ``keep``
    highest steps remain, plus the one just written if it is older than those (a caller
    that resumed from an older step must remove newer ones itself, or ``load_latest``
    keeps preferring them). The state is validated before anything touches the disk.
    Leftover ``.tmp-*`` entries are deleted first, so only one process may save into a
    ``directory`` at a time.
    """
    return _write(Path(directory), *_encode_state(step, state, keep), keep=keep)


def _encode_state(step: int, state: Mapping[str, Any], keep: int) -> tuple[int, dict[str, np.ndarray], bytes]:
    """(step, arrays by member name, state.json's bytes); every refusal happens here, before any I/O.

    The arrays are the caller's own buffers, not copies: they must not change until written.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, numbers.Integral) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1 (checkpoints), got {keep!r}")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping with str keys, got {type(state).__name__}")
    arrays: dict[str, np.ndarray] = {}
    tree = _encode(state, "state", arrays, set())
    return int(step), arrays, json.dumps(tree, allow_nan=False, separators=(",", ":")).encode("ascii")


def _write(directory: Path, step: int, arrays: dict[str, np.ndarray], state_bytes: bytes, *, keep: int) -> Path:
    """Write an encoded state as ``round-{step:08d}`` (temporary folder, fsync, rename), then prune."""
    root = directory / SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX):
            _remove(entry)
    final = root / f"round-{step:08d}"
    tmp = _temp_name(root, final.name)
    tmp.mkdir()
    try:
        with (tmp / ARRAYS_FILE).open("xb") as f:
            stream = HashingWriter(f)
            with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, array in arrays.items():  # what np.savez writes, to a stream it cannot take
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        _write_bytes(tmp / STATE_FILE, state_bytes)
        files = {
            STATE_FILE: {"size": len(state_bytes), "sha256": hashlib.sha256(state_bytes).hexdigest()},
            ARRAYS_FILE: {"size": stream.size, "sha256": stream.digest.hexdigest()},
        }
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode("ascii"))
        fsync_path(tmp)
        _move_into_place(tmp, final, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(root)

    existing = list_checkpoints(directory)
    survivors = {path for _, path in existing[-keep:]} | {final}
    for _, path in existing:
        if path not in survivors:
            doomed = _temp_name(root, f"pruned-{path.name}")
            os.rename(path, doomed)  # atomic: a half-deleted checkpoint never looks damaged
            shutil.rmtree(doomed)
    fsync_path(root)
    return final


def _load(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise _Damaged("does not exist" if not path.exists() else "is not a directory")
    files = _read_manifest(path)
    state_bytes = _read_verified(path, files)
    try:
        tree = json.loads(state_bytes.decode("ascii"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise _Damaged(f"{STATE_FILE} is not valid JSON ({err})") from None
    slots: list[_Slot] = []
    try:
        state = _decode(tree, "state", slots)
    except RecursionError:
        raise _Damaged(f"{STATE_FILE} is nested too deeply") from None
    if not isinstance(state, dict):
        raise _Damaged(f"{STATE_FILE} does not hold a mapping at the top level")
    names = {name for _, _, name in slots}
    if len(names) != len(slots):
        raise _Damaged(f"{STATE_FILE} references one array twice")
    try:
        arrays = _read_arrays(path, names)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError) as err:
        raise _Damaged(f"{ARRAYS_FILE} is not a readable npz archive ({err})") from None
    for container, key, name in slots:
        container[key] = arrays[name]
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved in the checkpoint directory ``path``, verified against its manifest.

    Raises :class:`CheckpointError` (one line: the directory and the reason) for anything
    that is not a complete, unmodified checkpoint of this format version.
    """
    try:
        return _load(Path(path))
    except _Damaged as err:
        raise CheckpointError(Path(path), str(err)) from None


def load_latest(directory: Path, check: Callable[[Path, dict[str, Any]], None] | None = None) -> LoadedCheckpoint:
    """The newest checkpoint under ``directory`` that reads cleanly, and why newer ones did not.

    ``check(path, state)`` may refuse a checkpoint that read cleanly by raising
    :class:`CheckpointError` (a run checkpoint whose clients' state files are damaged): it is
    passed over like an unreadable one. Raises FileNotFoundError if there is no checkpoint at
    all, and :class:`CheckpointError` listing every checkpoint and its reason if none is readable.
    """
    found = list_checkpoints(directory)
    if not found:
        raise FileNotFoundError(f"no checkpoints in {Path(directory) / SUBDIR}")
    skipped: list[tuple[Path, str]] = []
    for step, path in reversed(found):
        try:
            state = load_checkpoint(path)
            if check is not None:
                check(path, state)
        except CheckpointError as err:
            skipped.append((path, err.reason))
            continue
        return LoadedCheckpoint(step=step, state=state, path=path, skipped=skipped)
    reasons = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
    raise CheckpointError(Path(directory) / SUBDIR, f"no readable checkpoint ({reasons})")


class CheckpointWriter:
    """Writes checkpoints on a background thread while the caller goes on, never two at once.

    Why: at scale a checkpoint (a few model-sized arrays, written and fsynced) costs as much as
    a round's aggregation; written beside the next round it costs the round almost nothing.
    :meth:`submit` validates and encodes the state in the caller's thread (a bad state raises
    there, as :func:`save_checkpoint` does), waits for the previous write, then writes on a
    thread; the caller must not change the state's arrays until that write is done, or passes
    ``copy=True`` and waits for :meth:`wait_copied` instead (the copy is the thread's first
    step: it too runs beside the caller's next work). Crash safety is the synchronous
    writer's: a write killed midway leaves only a ``.tmp-*`` folder that readers ignore, so the
    previous checkpoint is the one a resume loads. A failed write re-raises from the next
    :meth:`submit` or :meth:`wait`.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._outcome: Path | BaseException | None = None
        self._staging: dict[str, np.ndarray] = {}  # copy=True's buffers, by member name, reused
        self._copied: threading.Event | None = None  # set once the write in flight no longer reads the caller's arrays

    def _staged(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copies of ``arrays`` in buffers this writer keeps from one checkpoint to the next.

        Why reuse: a fresh model-sized buffer per checkpoint costs its page faults (on a VM with
        transparent huge pages, measured at 10-170 ms for each 42 MB array of ResNet-18 against
        ~7 ms for the copy itself); the next checkpoint of the same run has the same arrays.
        Call only with no write in flight (the buffers are what it writes).
        """
        staged = {}
        for name, array in arrays.items():
            buffer = self._staging.get(name)
            if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
                buffer = np.empty_like(array, order="C")
            np.copyto(buffer, array)
            staged[name] = buffer
        self._staging = staged
        return staged

    def submit(self, directory: Path, step: int, state: Mapping[str, Any], *, keep: int = 3,
               copy: bool = False, before_write: Callable[[], None] | None = None) -> Path:
        """Start writing ``state`` as step ``step``; returns the folder it will have once written.

        ``copy``: write copies of the state's arrays (one memory copy of the state, into buffers
        reused from the last checkpoint), for a caller whose arrays change once
        :meth:`wait_copied` has returned: the copy is taken on the thread, so that it too runs
        while the caller goes on. ``before_write``: run on the thread after the copy (making
        files the state refers to durable); its failure is the write's.
        """
        step, arrays, state_bytes = _encode_state(step, state, keep)
        self.wait()
        directory = Path(directory)
        copied = self._copied = threading.Event()

        def write() -> None:
            try:
                written = self._staged(arrays) if copy else arrays
                if copy:  # without a copy the write reads the caller's arrays to its end
                    copied.set()
                if before_write is not None:
                    before_write()
                self._outcome = _write(directory, step, written, state_bytes, keep=keep)
            except BaseException as err:  # handed to the caller by wait()
                self._outcome = err
            finally:
                copied.set()

        self._thread = threading.Thread(target=write, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return directory / SUBDIR / f"round-{int(step):08d}"

    def wait_copied(self) -> None:
        """Block until the write in flight (if any) has copied the state it was handed (``copy=True``):
        from then on the caller may change those arrays. Its failure, if any, comes from :meth:`wait`."""
        if self._copied is not None:
            self._copied.wait()

    def wait(self) -> Path | None:
        """Block until the write in flight (if any) is on disk; its folder, or None if none was pending."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        outcome, self._outcome = self._outcome, None
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @property
    def busy(self) -> bool:
        """A write is in flight."""
        return self._thread is not None and self._thread.is_alive()
