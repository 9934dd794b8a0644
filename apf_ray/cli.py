"""apf-ray: communication-efficient federated learning with Adaptive Parameter Freezing, on Ray.

The CLI is a thin layer over the run API (:func:`apf_ray.run.run`): it chooses the backend
by name, so this package never imports Ray or ``actors`` itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from apf_ray.backends import backend_class
from apf_ray.config import ConfigError, ExperimentConfig, build_config, load_config
from apf_ray.metrics import plot_history, write_json
from apf_ray.progress import ProgressDisplay
from apf_ray.records import RoundRecord
from apf_ray.report import comparison_rows, comparison_table, summary_table
from apf_ray.resume import load_resume_point
from apf_ray.run import default_run_dir, run
from apf_ray.variants import variant_dirname, variant_overrides

# Logs and CI are not terminals; give tables room instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)


def _backend(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    return ("inprocess", {}) if args.inprocess else ("ray", {"address": args.address})


def _train(cfg: ExperimentConfig, run_dir: Path, args: argparse.Namespace, label: str, resume=None) -> dict:
    display = ProgressDisplay(console, label, show_events=not args.quiet)
    callbacks = [] if args.quiet else [display]
    backend, options = _backend(args)
    try:
        return run(cfg, run_dir, backend=backend, backend_options=options, callbacks=callbacks, resume=resume)
    finally:
        display.close()


def cmd_train(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        run_dir = Path(args.resume)
        resume = load_resume_point(run_dir)
        for path, reason in resume.skipped:
            console.print(f"[yellow]checkpoint {path.name} is damaged ({reason}); using {resume.path.name}")
        cfg = build_config(resume.config, args.set or [], source=f"{run_dir} + --set")
        console.print(f"resuming {run_dir} after round {resume.round}")
    else:
        cfg = load_config(args.config, args.set or [])
        run_dir = Path(args.output) if args.output else default_run_dir(cfg)
    summary = _train(cfg, run_dir, args, cfg.name, resume)
    console.print(summary_table(summary, title=f"{cfg.name} · {cfg.strategy.name}"))
    if cfg.output.tensorboard:
        console.print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


def _history(run_dir: Path) -> list[RoundRecord]:
    lines = (run_dir / "journal" / "rounds.jsonl").read_text().splitlines()
    return [RoundRecord(**json.loads(line)) for line in lines if line.strip()]


def cmd_compare(args: argparse.Namespace) -> int:
    base = load_config(args.config, args.set or [])
    out = Path(args.output) if args.output else default_run_dir(base)
    variants = {  # every variant is validated before any run starts
        spec: build_config(base.to_dict(), variant_overrides(spec, base.strategy.name), source=f"variant {spec}")
        for spec in args.strategies
    }
    results: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[RoundRecord]] = {}
    backend, options = _backend(args)
    with backend_class(backend).session(base, **options):  # Ray: one cluster for every variant
        for spec, cfg in variants.items():
            run_dir = out / variant_dirname(spec)
            results[spec] = _train(cfg, run_dir, args, spec)
            histories[spec] = _history(run_dir)
    rows = comparison_rows(results)
    console.print(comparison_table(rows, title=f"{base.name}: {base.train.rounds} rounds, "
                                                f"{base.train.clients_per_round} clients/round"))
    write_json(out / "compare.json", {"rows": rows, "config": base.to_dict()})
    plot = plot_history(out / "compare.png", histories, title=f"{base.name}: strategies side by side")
    console.print(f"wrote {out / 'compare.json'} and {plot}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from datetime import datetime

    from apf_ray.plugins import import_object
    from apf_ray.tuning import SEARCH_DRIVER, load_tune_spec

    if args.resume:
        if args.config or args.set:
            raise ValueError("--resume continues the search as it was saved; drop --config and --set")
        resume_search = import_object(SEARCH_DRIVER["resume"], "search driver")  # the Ray layer, by path
        resume_search(Path(args.resume), address=args.address, console=console)
        return 0
    if not args.config:
        raise ValueError("apf-ray tune needs --config tune_configs/NAME.yaml (or --resume DIR)")
    spec, base = load_tune_spec(args.config, args.set or [])
    output = Path(args.output) if args.output else Path("runs") / f"tune-{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_search = import_object(SEARCH_DRIVER["run"], "search driver")
    run_search(spec, base, output, address=args.address, console=console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apf-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (default: the digits + LeNet-5 + APF workload)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, repeatable")
        sp.add_argument("--address", help="existing Ray cluster address (default: start a local one)")
        sp.add_argument("--output", help="run directory")
        sp.add_argument("--inprocess", action="store_true", help="reference loop in this process, no Ray")
        sp.add_argument("--quiet", action="store_true", help="no progress display")

    t = sub.add_parser("train", help="run one federated training")
    common(t)
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="run several strategies on the same workload, side by side")
    common(c)
    c.add_argument("--strategies", nargs="+", default=["fedavg", "apf", "apf:aggressive_prob=0.3"],
                   help="variants 'name[:key=value,...][+stage[:key=value,...]]'; the first is the baseline")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("tune", help="search APF's knobs with Ray Tune (each trial a federated run)")
    s.add_argument("--config", help="search file, e.g. tune_configs/tiny.yaml")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the search file")
    s.add_argument("--address", help="existing Ray cluster address (default: start a local one)")
    s.add_argument("--output", help="output folder (default runs/tune-<name>-<time>)")
    s.add_argument("--resume", metavar="DIR", help="finish the interrupted search in DIR")
    s.set_defaults(func=cmd_tune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
