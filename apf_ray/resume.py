"""What a run's checkpoint holds, and reading it back to resume.

A checkpoint (written by :mod:`apf_ray.checkpoint`: JSON + ``.npy``, checksummed, never
unpickled) holds the resolved config, the server's state (model, strategy and controller
state, RNG, downlink bookkeeping, counters) and every client's strategy state (error-feedback
residuals, partial-sync local values) and the state of every callback that keeps one
(:meth:`apf_ray.callbacks.Callback.state_dict`, by its ``state_key``), so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apf_ray.checkpoint import CheckpointError, CheckpointWriter, load_checkpoint, load_latest, save_checkpoint
from apf_ray.client_store import STORE_DIR, StoredState, StoreLocation, states_from_json, verify
from apf_ray.config import ConfigError, ExperimentConfig, build_config
from apf_ray.downlink import DownlinkTracker
from apf_ray.errors import SetupError, describe
from apf_ray.server import check_param_count
from apf_ray.strategies import make_strategy
from apf_ray.workload import Workload, sampling_rng

if TYPE_CHECKING:
    from apf_ray.server import ServerCore

FORMAT = "apf-ray-run"


def save_run_checkpoint(run_dir: Path, cfg: ExperimentConfig, server: ServerCore,
                        client_state: dict[int, StoredState], callbacks: dict[str, Any],
                        writer: CheckpointWriter | None = None, *, store: StoreLocation,
                        before_write: Callable[[], None] | None = None) -> Path:
    """Checkpoint the run after ``server.round`` rounds; returns the checkpoint directory.

    ``client_state``: each client's record in ``store`` (its files are never changed later:
    a client's next round writes new ones). ``callbacks``: each stateful callback's
    ``state_dict()`` under its ``state_key``. ``before_write`` runs first, where the write
    runs (the engine makes the state files durable). With a ``writer`` the checkpoint is
    written in the background, from copies of the state's arrays taken there too: the server
    may change once ``writer.wait_copied()`` returns, and the folder exists once
    ``writer.wait()`` returns.
    """
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "server": server.state_dict(),
        "client_store": {"root": store.root,
                         "clients": {str(cid): s.to_json() for cid, s in sorted(client_state.items())}},
        "callbacks": callbacks,
    }
    if writer is not None:
        return writer.submit(Path(run_dir), server.round, state, keep=cfg.output.keep_checkpoints, copy=True,
                             before_write=before_write)
    if before_write is not None:
        before_write()
    return save_checkpoint(Path(run_dir), server.round, state, keep=cfg.output.keep_checkpoints)


@dataclass
class ResumePoint:
    """The newest valid checkpoint of a run directory."""

    round: int
    config: dict[str, Any]
    server: dict[str, Any]
    clients: dict[int, dict]  # clients' states held in the checkpoint itself (written before the store)
    path: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints that were damaged
    callbacks: dict[str, Any] = field(default_factory=dict)  # callbacks' state by state_key
    stored: dict[int, StoredState] = field(default_factory=dict)  # clients' records in the store at store_root
    store_root: Path | None = None  # the store holding their files (checked: every file's size and SHA-256)

    def client_ids(self) -> set[int]:
        """Every client with strategy state in this checkpoint."""
        return set(self.clients) | set(self.stored)


def _store_root(path: Path, recorded: str, stored: dict[int, StoredState]) -> Path:
    """Where a checkpoint's state files are, checked (ValueError naming a bad file): inside it (a
    copy handed to Tune, :func:`apf_ray.client_store.self_contained`), the store beside it
    (``<run>/checkpoints/round-N`` → ``<run>/client_state``, wherever the run folder was moved),
    else the store it was taken in."""
    for candidate in (Path(path) / STORE_DIR, (path.parent.parent / STORE_DIR).resolve()):
        if candidate != Path(recorded) and candidate.is_dir():
            try:
                verify(candidate, stored)
                return candidate
            except ValueError:
                pass
    verify(Path(recorded), stored)
    return Path(recorded)


def _resume_point(state: Any, path: Path, skipped: list[tuple[Path, str]]) -> ResumePoint:
    """The resume point of a loaded checkpoint, its state files checked (CheckpointError if one is not right)."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an apf-ray run checkpoint")
    point = ResumePoint(
        round=int(state["server"]["round"]),
        config=state["config"],
        server=state["server"],
        clients={int(cid): s for cid, s in state.get("clients", {}).items()},
        path=path,
        skipped=skipped,
        callbacks=dict(state.get("callbacks", {})),  # none in checkpoints written before callbacks had state
    )
    store = state.get("client_store")
    if store is not None:
        try:
            point.stored = states_from_json(store["clients"])
            point.store_root = _store_root(path, store["root"], point.stored)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(path, f"clients' state: {err}") from None
    return point


def load_resume_point(run_dir: Path) -> ResumePoint:
    """The newest valid checkpoint under ``run_dir`` (FileNotFoundError if there is none); one whose
    clients' state files are missing or damaged is passed over like a damaged checkpoint."""
    points: dict[Path, ResumePoint] = {}

    def check(path: Path, state: dict[str, Any]) -> None:
        points[path] = _resume_point(state, path, [])

    loaded = load_latest(Path(run_dir), check=check)
    point = points[loaded.path]
    point.skipped = list(loaded.skipped)
    return point


def read_resume_point(checkpoint_dir: Path) -> ResumePoint:
    """One checkpoint directory (``round-NNNNNNNN``, or a copy of it such as a Tune checkpoint)."""
    return _resume_point(load_checkpoint(Path(checkpoint_dir)), Path(checkpoint_dir), [])


RESUMABLE = ("train.rounds", "train.eval_every", "cluster.", "output.", "faults.", "defence.")
"""Config fields a resumed run may change: how long and how it runs, not what it computes."""

FIXED_ON_RESUME = ("output.dir",)
"""A resumed run continues in its own folder."""


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def config_changes(saved: dict[str, Any], cfg: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for every field of ``cfg`` that differs from ``saved``.

    Both sides are normalised by this version's config model, so defaults filled in since
    the checkpoint was written do not count as changes.
    """
    old = _flatten(build_config(saved, source="the checkpoint's config").to_dict())
    new = _flatten(cfg.to_dict())
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_resume_config(saved: dict[str, Any], cfg: ExperimentConfig, rounds_done: int,
                        asked_by: str = "now", may_change: Sequence[str] = ()) -> None:
    """ConfigError naming the field if ``cfg`` changes what the checkpointed run computes.

    Allowed: more rounds (``train.rounds`` ≥ the rounds done), ``train.eval_every``, the
    ``cluster``, ``output`` (but not ``output.dir``), ``faults`` and ``defence`` sections, and
    the fields in ``may_change`` (a PBT exploit continues a donor's run under the trial's own
    name and searched hyperparameters).
    """
    for path, old, new in config_changes(saved, cfg):
        if path == "train.rounds":
            if new < rounds_done:
                raise ConfigError(f"--resume: train.rounds ({new}) is below the {rounds_done} rounds already done")
            continue
        if (path.startswith(RESUMABLE) and path not in FIXED_ON_RESUME) or path in may_change:
            continue
        raise ConfigError(f"--resume keeps the run's meaning: {path} cannot change (was {old!r}, {asked_by} {new!r})")


def check_server_state(cfg: ExperimentConfig, workload: Workload, state: dict[str, Any]) -> None:
    """ValueError saying what does not fit if ``state`` (a saved ``ServerCore.state_dict()``)
    cannot be the state of ``cfg``'s server, checked without building one (no evaluation model).

    The arrays must match the workload's (parameters, buffers: count and float32 values), and
    the strategy's, the sampling generator's and the downlink bookkeeping's state must load into
    fresh ones, exactly as ``ServerCore.load_state_dict`` will load them on the backend.
    """
    params = np.asarray(state["params"], dtype=np.float32)
    check_param_count(params, workload.init_params.size)
    buffers = np.asarray(state["buffers"], dtype=np.float32)
    if buffers.shape != workload.init_buffers.shape:
        raise ValueError(f"checkpoint holds {buffers.size} buffer values, the configured model has "
                         f"{workload.init_buffers.size}")
    strategy = make_strategy(cfg.strategy.name, cfg.strategy.options, cfg.strategy.uplink, cfg.seed)
    strategy.setup(workload.init_params.copy())
    strategy.load_state_dict(state["strategy"])
    sampling_rng(cfg.seed).bit_generator.state = state["rng"]
    DownlinkTracker(params.size).load_state_dict(state["downlink"])
    counters = ("round", "cum_bytes_up", "cum_bytes_down", "cum_simulated_s")
    wrong = [key for key in counters if not isinstance(state.get(key), int | float)]
    if wrong:
        raise ValueError(f"the server state's {', '.join(wrong)} is not a number")


def check_resume(cfg: ExperimentConfig, point: ResumePoint, workload: Workload, may_change: Sequence[str] = ()) -> None:
    """Refuse, before any cluster starts, a checkpoint that does not belong to ``cfg``'s run.

    The config must keep the run's meaning (:func:`check_resume_config`), the saved server
    state must fit a server of ``cfg`` (:func:`check_server_state`: parameter count, strategy
    and controller state, downlink bookkeeping), and the client state must be of its clients.
    """
    check_resume_config(point.config, cfg, point.round, may_change=may_change)
    try:
        check_server_state(cfg, workload, point.server)
    except Exception as err:
        raise SetupError(f"checkpoint {point.path} does not fit the configured run: {describe(err)}") from None
    strangers = sorted(c for c in point.client_ids() if not 0 <= c < workload.num_clients)
    if strangers:
        raise SetupError(f"checkpoint {point.path} holds state of clients {strangers[:10]}, "
                         f"the run has {workload.num_clients}")
