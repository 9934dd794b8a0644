"""What a run's checkpoint holds, and reading it back to resume.

A checkpoint (written by :mod:`apf_ray.checkpoint`: JSON + ``.npy``, checksummed, never
unpickled) holds the resolved config, the server's state (model, strategy and controller
state, RNG, downlink bookkeeping, counters) and every client's strategy state (error-feedback
residuals, partial-sync local values), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apf_ray.checkpoint import load_checkpoint, load_latest, save_checkpoint
from apf_ray.config import ExperimentConfig
from apf_ray.server import ServerCore

FORMAT = "apf-ray-run"


def save_run_checkpoint(run_dir: Path, cfg: ExperimentConfig, server: ServerCore,
                        client_state: dict[int, dict]) -> Path:
    """Checkpoint the run after ``server.round`` rounds; returns the checkpoint directory."""
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "server": server.state_dict(),
        "clients": {str(cid): s for cid, s in sorted(client_state.items())},
    }
    return save_checkpoint(Path(run_dir), server.round, state, keep=cfg.output.keep_checkpoints)


@dataclass
class ResumePoint:
    """The newest valid checkpoint of a run directory."""

    round: int
    config: dict[str, Any]
    server: dict[str, Any]
    clients: dict[int, dict]
    path: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints that were damaged


def _resume_point(state: Any, path: Path, skipped: list[tuple[Path, str]]) -> ResumePoint:
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not an apf-ray run checkpoint")
    return ResumePoint(
        round=int(state["server"]["round"]),
        config=state["config"],
        server=state["server"],
        clients={int(cid): s for cid, s in state["clients"].items()},
        path=path,
        skipped=skipped,
    )


def load_resume_point(run_dir: Path) -> ResumePoint:
    """The newest valid checkpoint under ``run_dir`` (FileNotFoundError if there is none)."""
    loaded = load_latest(Path(run_dir))
    return _resume_point(loaded.state, loaded.path, list(loaded.skipped))


def read_resume_point(checkpoint_dir: Path) -> ResumePoint:
    """One checkpoint directory (``round-NNNNNNNN``, or a copy of it such as a Tune checkpoint)."""
    return _resume_point(load_checkpoint(Path(checkpoint_dir)), Path(checkpoint_dir), [])
