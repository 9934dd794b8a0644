"""One run of the reproduction in its own process: ``python -m reproduce.worker SPEC.json``.

A separate process per run keeps runs independent (torch's global state, memory: its peak
RSS is Table III's memory figure) and lets two run at a time on two cores. The spec file
holds the run's resolved config, its folder, whether to attach the stability probe, and the
run it continues (if any). An interrupted run resumes from its last checkpoint; a folder
whose checkpoint belongs to another config is started again from scratch.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from apf_ray.callbacks import Callback, RunView
from apf_ray.config import ExperimentConfig, build_config
from apf_ray.errors import RunStopped
from apf_ray.provenance import LoadSampler, now
from apf_ray.resume import ResumePoint, load_resume_point
from apf_ray.stability_probe import PROBE_DIR, StabilityProbe

WORKER_FILE = "worker.json"
_DERIVED = ("summary.json", "rounds.parquet", "clients.parquet", "layers.parquet", WORKER_FILE, PROBE_DIR)


class ControllerTiming(Callback):
    """Times every call of the APF controller's ``update`` in the real run (Table III), in seconds."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.num_params = 0
        self.state_bytes = 0

    def on_start(self, view: RunView) -> None:
        if view.info.get("backend") != "inprocess":  # only an engine in this process hands back the live controller
            return
        controller = view.query(_controller)
        if controller is None:
            return
        self.num_params, self.state_bytes = controller.num_params, controller.state_nbytes
        update = controller.update

        def timed(params):
            start = time.perf_counter()
            mask = update(params)
            self.seconds.append(time.perf_counter() - start)
            return mask

        controller.update = timed  # the instance attribute shadows the method for this run only

    def report(self) -> dict[str, Any] | None:
        if not self.seconds:
            return None
        ordered = sorted(self.seconds)
        return {"calls": len(ordered), "mean_s": sum(ordered) / len(ordered), "median_s": ordered[len(ordered) // 2],
                "num_params": self.num_params, "state_bytes": self.state_bytes}


def _controller(server: Any) -> Any:
    """The server's APF controller (None without one): the live object, the engine being in this process."""
    return getattr(server.strategy, "controller", None)


def _same_run(checkpoint_config: dict[str, Any], cfg: ExperimentConfig) -> bool:
    """Whether a checkpoint belongs to this run (a continuation only raises train.rounds)."""
    try:
        return build_config(checkpoint_config, {"train.rounds": cfg.train.rounds}).to_dict() == cfg.to_dict()
    except ValueError:
        return False


def _fresh(run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def prepare(run_dir: Path, cfg: ExperimentConfig, *, probe: bool, extends: Path | None) -> ResumePoint | None:
    """Where the run starts: a resume point (an interrupted run, or the run it continues) or scratch."""
    if extends is not None and not (run_dir / "checkpoints").is_dir():
        _fresh(run_dir)
        shutil.copytree(extends, run_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*_DERIVED))
    try:
        resume = load_resume_point(run_dir)
    except (FileNotFoundError, ValueError):
        resume = None
    if (resume is not None and resume.round <= cfg.train.rounds and _same_run(resume.config, cfg)
            and (not probe or StabilityProbe.state_key in resume.callbacks)):
        for name in _DERIVED[:-1]:  # an older summary must not pass for this run's
            (run_dir / name).unlink(missing_ok=True)
        return resume
    if extends is not None:
        raise RuntimeError(f"{extends} has no usable final checkpoint to continue from")
    _fresh(run_dir)
    return None


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    run_dir = Path(spec["run_dir"])
    cfg = build_config(spec["config"], source=spec_path)
    extends = Path(spec["extends_dir"]) if spec.get("extends_dir") else None
    resume = prepare(run_dir, cfg, probe=spec["probe"], extends=extends)
    timing = ControllerTiming()
    callbacks: list[Callback] = [timing]
    if spec["probe"]:
        callbacks.append(StabilityProbe(threshold=spec.get("probe_threshold", 0.05), trajectories=12, seed=cfg.seed))
    from apf_ray.run import run

    print(f"{spec['key']}: {'resuming after round ' + str(resume.round) if resume else 'starting'}", flush=True)
    start = time.perf_counter()
    try:
        with LoadSampler() as load:
            summary = run(cfg, run_dir, callbacks=callbacks, resume=resume)
    except RunStopped as stop:  # SIGINT/SIGTERM: checkpointed; the next `apf-ray reproduce` resumes it
        out = run_dir.parent.parent  # OUTPUT/runs/KEY
        print(f"{spec['key']}: {stop.within(f'apf-ray reproduce --resume {out}', '').message}", flush=True)
        return stop.exit_code
    info = {
        "key": spec["key"], "date": now(), "process_wall_s": time.perf_counter() - start,
        "resumed_after_round": resume.round if resume else 0,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "load_average": load.report(), "controller_timing": timing.report(),
    }
    (run_dir / WORKER_FILE).write_text(json.dumps(info, indent=2, allow_nan=False) + "\n")
    print(f"{spec['key']}: done, {summary['rounds']} rounds, final accuracy {summary['final_accuracy']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
