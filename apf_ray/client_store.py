"""Per-client strategy state on disk: hot clients in memory, the rest memory-mapped from the run folder.

Why: a strategy's per-client state (Top-k/Gaia error-feedback residuals, a partial-sync client's
local values, GWPF's frozen changes) is one model-sized vector per client. Kept in the engine and
sent with every call, 10,000 Top-k clients of ResNet-18 need ~450 GB of the driver's RAM and move
two model copies per client per round. Here each state lives in ``<run>/client_state/`` as plain
``.npy`` files, read (memory-mapped) and written only by the client host that trains the client;
the engine keeps and checkpoints a :class:`StoredState` per client: file names, sizes and SHA-256
digests (~200 bytes), which is all that travels with a call and its result.

Copy-on-write, so a checkpoint is consistent: a client trained in round r writes new files named
for r (``c{client}-r{round}-{i}.npy``, renamed into place) and never changes a file an older
version, or a checkpoint, refers to. A checkpoint records each client's :class:`StoredState`
(in its checksummed ``state.json``); a crash mid-round leaves only files no checkpoint names.
Files no kept checkpoint and no live client refers to are deleted at the next checkpoint
(:func:`collect_garbage`). Reading never executes code (``allow_pickle=False``), and a resume
checks every file's size and digest first (:func:`verify`).

Each :class:`ClientStateStore` (one per client host: the in-process host, each Ray client actor)
keeps the states it wrote last in a bounded LRU (``cluster.client_state_cache_mb``, MiB), so a
client trained again soon is not re-read; written states always go to disk too (write-through),
so any host that sees the folder can train any client. A host that does not see the folder (a
client actor on another node without a shared filesystem; :meth:`StoreLocation.visible` checks the
folder's ``STORE_ID``) gets its clients' states shipped with the call and returns them whole;
the engine writes them (the Ray pools decide per actor, :func:`ship`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np

from apf_ray.checkpoint import STATE_FILE, HashingWriter, fsync_path, list_checkpoints, sha256_file

STORE_DIR: Final = "client_state"
"""The store's folder inside a run folder."""

ID_FILE: Final = "STORE_ID"
"""A random token naming the run's store: a host that reads the same token sees the same folder."""

_FILE_RE: Final = re.compile(r"c(\d+)-r(\d+)-(\d+)\.npy")
_TMP_MARK: Final = ".tmp-"
_MIB: Final = 1 << 20


@dataclass(frozen=True)
class StoreLocation:
    """Where a run's client states live: the folder (absolute) and its ``STORE_ID`` token."""

    root: str
    token: str

    def visible(self) -> bool:
        """This process sees the store: the folder exists here and holds this run's token."""
        try:
            return (Path(self.root) / ID_FILE).read_text() == self.token
        except OSError:
            return False


def open_store(run_dir: Path) -> StoreLocation:
    """The store of ``run_dir`` (``<run_dir>/client_state``), created with a new token if it has none."""
    root = Path(run_dir).resolve() / STORE_DIR
    root.mkdir(parents=True, exist_ok=True)
    id_file = root / ID_FILE
    if not id_file.is_file():
        tmp = root / f"{ID_FILE}{_TMP_MARK}{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex)
        os.replace(tmp, id_file)
    return StoreLocation(str(root), id_file.read_text())


@dataclass(frozen=True)
class StoredState:
    """A client's strategy state as written in ``round``: its top-level arrays on disk, the rest inline.

    ``arrays``: key → (file name in the store, size in bytes, SHA-256 hex of the file).
    ``values``: the state's other entries (JSON scalars, small structures), kept as they are.
    """

    round: int
    arrays: Mapping[str, tuple[str, int, str]]
    values: Mapping[str, Any]

    def files(self) -> list[str]:
        """The store files this state is made of."""
        return [name for name, _, _ in self.arrays.values()]

    def to_json(self) -> dict[str, Any]:
        """The checkpoint form (str keys, JSON leaves; ``values`` as the checkpoint encodes them)."""
        return {"round": self.round, "values": dict(self.values),
                "arrays": {key: {"file": name, "size": size, "sha256": sha}
                           for key, (name, size, sha) in self.arrays.items()}}

    @classmethod
    def from_json(cls, data: Any, client_id: int) -> StoredState:
        """Back from :meth:`to_json`; ValueError naming the client if anything is malformed."""
        try:
            arrays = {}
            for key, entry in data["arrays"].items():
                name, size, sha = entry["file"], entry["size"], entry["sha256"]
                match = _FILE_RE.fullmatch(name) if isinstance(name, str) else None
                if match is None or int(match.group(1)) != client_id or not isinstance(size, int) \
                        or not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
                    raise ValueError(f"entry {key!r} is {entry!r}")
                arrays[key] = (name, size, sha)
            stored_round, values = data["round"], data["values"]
            if not isinstance(stored_round, int) or not isinstance(values, dict):
                raise ValueError("round or values malformed")
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"client {client_id}'s stored state is malformed ({err})") from None
        return cls(stored_round, arrays, values)


def file_name(client_id: int, round_idx: int, index: int) -> str:
    """The store file of a client's ``index``-th array as written in round ``round_idx``."""
    return f"c{client_id}-r{round_idx}-{index}.npy"


def _write_array(root: Path, name: str, array: np.ndarray) -> tuple[str, int, str]:
    """Write ``array`` as ``root/name`` (temporary file, renamed), hashed as it is written."""
    tmp = root / f"{name}{_TMP_MARK}{uuid.uuid4().hex}"
    try:
        with tmp.open("xb") as f:
            stream = HashingWriter(f)
            np.lib.format.write_array(stream, np.asarray(array), allow_pickle=False)
        os.replace(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return name, stream.size, stream.digest.hexdigest()


def _read_array(root: Path, name: str) -> np.ndarray:
    """A read-only ndarray over the memory-mapped file (the OS pages it in as it is read)."""
    return np.asarray(np.load(root / name, mmap_mode="r", allow_pickle=False))


def _nbytes(state: Mapping[str, Any]) -> int:
    return sum(v.nbytes for v in state.values() if isinstance(v, np.ndarray))


class ClientStateStore:
    """One host's reader and writer of a run's client states, with an LRU of the last written ones.

    ``cache_mb``: the most state, in MiB of array bytes, kept in memory (0: none); what the
    cache holds is :attr:`cached_bytes`, the store's whole resident share of this process.
    """

    def __init__(self, location: StoreLocation, cache_mb: float = 0.0) -> None:
        self.location = location
        self.root = Path(location.root)
        self.limit = int(cache_mb * _MIB)
        self._cache: OrderedDict[int, tuple[int, dict[str, Any]]] = OrderedDict()  # client → (round, state)
        self.cached_bytes = 0

    def load(self, client_id: int, stored: StoredState) -> dict[str, Any]:
        """The client's state (a new dict; its arrays are read-only: strategies replace, never write them)."""
        hit = self._cache.get(client_id)
        if hit is not None and hit[0] == stored.round:
            self._cache.move_to_end(client_id)
            return dict(hit[1])
        state = dict(stored.values)
        for key, (name, _, _) in stored.arrays.items():
            state[key] = _read_array(self.root, name)
        return state

    def save(self, client_id: int, round_idx: int, state: Mapping[str, Any]) -> StoredState:
        """Write the client's state as of ``round_idx`` (new files), keep it in the cache; its record."""
        arrays, values = {}, {}
        for index, (key, value) in enumerate(sorted(state.items())):
            if isinstance(value, np.ndarray):
                arrays[key] = _write_array(self.root, file_name(client_id, round_idx, index), value)
            else:
                values[key] = value
        self._remember(client_id, round_idx, dict(state))
        return StoredState(round_idx, arrays, values)

    def _remember(self, client_id: int, round_idx: int, state: dict[str, Any]) -> None:
        old = self._cache.pop(client_id, None)
        if old is not None:
            self.cached_bytes -= _nbytes(old[1])
        size = _nbytes(state)
        if not 0 < size <= self.limit:  # a state without arrays is all in its record: nothing to cache
            return
        for value in state.values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False  # a strategy changing a cached array in place would change history
        self._cache[client_id] = (round_idx, state)
        self.cached_bytes += size
        while self.cached_bytes > self.limit:
            _, (_, evicted) = self._cache.popitem(last=False)
            self.cached_bytes -= _nbytes(evicted)

    def ship(self, calls: Sequence[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """``calls`` with each :class:`StoredState` read into a whole state, for a host that cannot
        see the store (copies: they travel by pickling)."""
        return [(cid, {k: np.array(v) if isinstance(v, np.ndarray) else v
                       for k, v in self.load(cid, s).items()} if isinstance(s, StoredState) else s)
                for cid, s in calls]


class HostStates:
    """A client host's side of the store: what a call's state becomes before and after training."""

    def __init__(self, cache_mb: float) -> None:
        self.cache_mb = cache_mb
        self._store: ClientStateStore | None = None

    def store(self, location: StoreLocation | None) -> ClientStateStore | None:
        """The store at ``location`` if this process sees it, else None (states come and go whole)."""
        if location is None:
            return None
        if self._store is None or self._store.location != location:
            self._store = ClientStateStore(location, self.cache_mb) if location.visible() else None
        return self._store

    def open(self, location: StoreLocation | None, client_id: int, state: Any) -> dict[str, Any] | None:
        """The state to train with: read from the store, a shipped one, or None (a new client)."""
        if isinstance(state, StoredState):
            store = self.store(location)
            if store is None:
                raise RuntimeError(f"client {client_id}'s state is in {location.root if location else 'a store'}, "
                                   "which this host cannot see")
            return store.load(client_id, state)
        return None if state is None else dict(state)

    def close(self, location: StoreLocation | None, round_idx: int, client_id: int, shipped: bool,
              state: dict[str, Any]) -> StoredState | dict[str, Any] | None:
        """What goes back to the engine: the state's record once written here, or the state itself
        (it was shipped, or this host cannot see the store); None if it is empty."""
        if not state:
            return None
        store = None if shipped else self.store(location)
        return state if store is None else store.save(client_id, round_idx, state)


def fsync_files(location: StoreLocation, names: Iterable[str]) -> None:
    """Make ``names`` (and their renames) durable before a checkpoint that refers to them is."""
    root = Path(location.root)
    for path in [*(root / name for name in names), root]:
        fsync_path(path)


def verify(root: Path, states: Mapping[int, StoredState]) -> None:
    """ValueError naming the first file that is missing, or whose size or SHA-256 is not what
    ``states`` recorded (every byte of every file is read)."""
    for cid, stored in sorted(states.items()):
        for key, (name, size, sha) in stored.arrays.items():
            path = Path(root) / name
            try:
                actual = path.stat().st_size
            except OSError:
                raise ValueError(f"client {cid}'s state file {path} is missing") from None
            if actual != size or sha256_file(path) != sha:
                raise ValueError(f"client {cid}'s state file {path} ({key}) does not match its checksum")


def states_from_json(data: Mapping[str, Any]) -> dict[int, StoredState]:
    """The checkpoint's client records (``{client id: StoredState.to_json()}``) back as objects."""
    return {int(cid): StoredState.from_json(entry, int(cid)) for cid, entry in data.items()}


def import_states(states: Mapping[int, StoredState], source: Path, location: StoreLocation) -> None:
    """Copy the files of ``states`` from another store (a checkpoint taken elsewhere, e.g. a Tune
    copy of another trial's) into ``location``'s. ``source`` must be one :func:`verify` passed
    (a :class:`~apf_ray.resume.ResumePoint`'s ``store_root`` is): every byte is not hashed twice."""
    target = Path(location.root)
    for stored in states.values():
        for name in stored.files():
            if not (target / name).exists():
                _write_array(target, name, np.load(Path(source) / name, allow_pickle=False))


def discard_if_unused(run_dir: Path) -> None:
    """Remove ``<run_dir>/client_state`` when it holds nothing but its ``STORE_ID``: what
    :func:`open_store` made for a run that then never started (refused while waiting for
    resources, say), so that the run folder's claim can remove the folder it made."""
    root = Path(run_dir) / STORE_DIR
    try:
        names = [path.name for path in root.iterdir()]
    except OSError:
        return
    if names == [ID_FILE]:
        with contextlib.suppress(OSError):
            (root / ID_FILE).unlink()
            root.rmdir()


def self_contained(checkpoint: Path, staging: Path) -> Path:
    """``staging`` made a copy of ``checkpoint`` that carries its clients' state files in
    ``staging/client_state/`` (hard links where the filesystem allows, else copies): what is
    handed to Tune, which copies a trial's checkpoint into its own storage. A PBT exploit or a
    restart elsewhere then restores from files no longer the donor run's to delete (its next
    checkpoint's clean-up) and that need not be on the donor's node."""
    staging.mkdir(parents=True)
    for path in Path(checkpoint).iterdir():
        _link_or_copy(path, staging / path.name)
    tree = json.loads((Path(checkpoint) / STATE_FILE).read_bytes())
    store = tree.get("client_store") or {}
    names = sorted({entry["file"] for client in store.get("clients", {}).values()
                    for entry in client["arrays"].values()})
    if names:
        (staging / STORE_DIR).mkdir()
        for name in names:
            _link_or_copy(Path(store["root"]) / name, staging / STORE_DIR / name)
    return staging


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link of the file ``source`` at ``target`` (no bytes copied), or a copy across devices."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def checkpointed_files(run_dir: Path) -> set[str] | None:
    """The store files the run's checkpoints on disk refer to (their ``state.json`` read raw);
    None if one cannot be read, so nothing is deleted on a guess."""
    names: set[str] = set()
    for _, path in list_checkpoints(run_dir):
        try:
            tree = json.loads((path / STATE_FILE).read_bytes())
            entries = tree.get("client_store", {}).get("clients", {})
            names.update(entry["file"] for client in entries.values() for entry in client["arrays"].values())
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return None
    return names


def _is_state_file(name: str) -> bool:
    """A name of the store's own patterns (a state file, or one being written): nothing else is apf-ray's."""
    return bool(_FILE_RE.fullmatch(name.split(_TMP_MARK)[0]))


def collect_garbage(run_dir: Path, location: StoreLocation, live: Iterable[str]) -> int:
    """Delete state files neither ``live`` nor a checkpoint on disk refers to (superseded versions,
    states of timed-out clients, writes a crash interrupted, an earlier run's after ``--overwrite``);
    how many went. Call it between rounds: a write in flight would lose its file.
    """
    keep = checkpointed_files(run_dir)
    if keep is None:
        return 0
    keep.update(live)
    doomed = [entry for entry in Path(location.root).iterdir()
              if _is_state_file(entry.name) and entry.name not in keep]
    for entry in doomed:
        entry.unlink(missing_ok=True)
    return len(doomed)
