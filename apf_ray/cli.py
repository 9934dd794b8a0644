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
from rich.markup import escape

from apf_ray.backends import backend_class
from apf_ray.callbacks import Callback, RunContext
from apf_ray.config import ConfigError, ExperimentConfig, build_config, load_config
from apf_ray.errors import RunStopped, SetupError, describe
from apf_ray.metrics import plot_history, write_json
from apf_ray.progress import ProgressDisplay
from apf_ray.records import RoundRecord
from apf_ray.report import comparison_rows, comparison_table, summary_table
from apf_ray.resume import ResumePoint, check_resume_config, load_resume_point
from apf_ray.run import default_run_dir, run, run_files
from apf_ray.variants import variant_dirname, variant_overrides

# Logs and CI are not terminals; give tables room instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)


def _backend(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    return ("inprocess", {}) if args.inprocess else ("ray", {"address": args.address})


def _note(text: str) -> None:
    console.print(f"[yellow]note:[/yellow] {escape(text)}", soft_wrap=True, highlight=False)


def _report_ignored(args: argparse.Namespace, cfg: ExperimentConfig) -> None:
    """Say which given options have no effect, instead of dropping them silently."""
    if args.inprocess and args.address:
        _note(f"--address {args.address} is ignored with --inprocess (no Ray cluster is used)")
    if args.inprocess and cfg.cluster.address:
        _note(f"cluster.address {cfg.cluster.address} is ignored with --inprocess")
    if args.output and cfg.output.dir and Path(args.output) != Path(cfg.output.dir):
        _note(f"--output {args.output} replaces output.dir {cfg.output.dir} of the config")


class _Replaced(Callback):
    """Says what ``--overwrite`` removed, once the new run has started (even with --quiet)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_start(self, ctx: RunContext) -> None:
        if ctx.info.get("replaced"):
            _note(f"--overwrite removed the earlier run's {', '.join(ctx.info['replaced'])} from {self.run_dir}")


def _train(cfg: ExperimentConfig, run_dir: Path, args: argparse.Namespace, label: str, resume=None) -> dict:
    display = ProgressDisplay(console, label, show_events=not args.quiet)
    callbacks: list[Callback] = [_Replaced(run_dir)] + ([] if args.quiet else [display])
    backend, options = _backend(args)
    try:
        return run(cfg, run_dir, backend=backend, backend_options=options, callbacks=callbacks, resume=resume,
                   overwrite=args.overwrite)
    finally:
        display.close()


def _resume_config(args: argparse.Namespace) -> tuple[ExperimentConfig, Path, ResumePoint]:
    """The checkpointed run's config with the allowed ``--set`` changes; errors name the option or field."""
    run_dir = Path(args.resume)
    if args.config:
        raise ConfigError(f"--config cannot be used with --resume: the run in {run_dir} keeps its own config "
                          "(change what may change with --set)")
    if args.output and Path(args.output).resolve() != run_dir.resolve():
        raise ConfigError(f"--output {args.output} differs from --resume {run_dir}: a resumed run continues "
                          "in its own folder")
    if args.overwrite:
        raise ConfigError("--overwrite cannot be used with --resume: resuming continues the run")
    resume = load_resume_point(run_dir)
    for path, reason in resume.skipped:
        _note(f"checkpoint {path.name} is damaged ({reason}); using {resume.path.name}")
    cfg = build_config(resume.config, args.set or [], source=f"{run_dir} + --set")
    check_resume_config(resume.config, cfg, resume.round, asked_by="--set asks")
    return cfg, run_dir, resume


def cmd_train(args: argparse.Namespace) -> int:
    resume = None
    if args.resume:
        cfg, run_dir, resume = _resume_config(args)
        _report_ignored(args, cfg)
        console.print(f"resuming {run_dir} after round {resume.round}", soft_wrap=True)
    else:
        cfg = load_config(args.config, args.set or [])
        run_dir = Path(args.output) if args.output else default_run_dir(cfg)
        _report_ignored(args, cfg)
    summary = _train(cfg, run_dir, args, cfg.name, resume)
    console.print(summary_table(summary, title=f"{cfg.name} · {cfg.strategy.name}"))
    if cfg.output.tensorboard:
        console.print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}", soft_wrap=True)
    return 0


def _history(run_dir: Path) -> list[RoundRecord]:
    lines = (run_dir / "journal" / "rounds.jsonl").read_text().splitlines()
    return [RoundRecord(**json.loads(line)) for line in lines if line.strip()]


def cmd_compare(args: argparse.Namespace) -> int:
    base = load_config(args.config, args.set or [])
    out = Path(args.output) if args.output else default_run_dir(base)
    _report_ignored(args, base)
    variants = {  # every variant is validated before any run starts
        spec: build_config(base.to_dict(), variant_overrides(spec, base.strategy.name), source=f"variant {spec}")
        for spec in args.strategies
    }
    taken = [out / variant_dirname(spec) for spec in variants if run_files(out / variant_dirname(spec))]
    if taken and not args.overwrite:
        raise SetupError(f"{', '.join(map(str, taken))} already hold(s) a run; replace with --overwrite "
                         "or choose another --output")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apf-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (default: the digits + LeNet-5 + APF workload)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, repeatable")
        sp.add_argument("--address", help="existing Ray cluster address (default: start a local one)")
        sp.add_argument("--output", help="run directory (refused if it holds a run, unless --overwrite)")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output (its outputs only; other files stay)")
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
    return p


def _error(err: BaseException) -> int:
    console.print(f"[red]error:[/red] {escape(describe(err))}", soft_wrap=True, highlight=False)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 a usage, config, data or checkpoint error (one ``error:`` line),
    130 / 143 stopped by SIGINT / SIGTERM (resumable from the printed folder)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunStopped as stop:
        console.print(f"[yellow]{escape(stop.message)}", soft_wrap=True, highlight=False)
        return stop.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted", highlight=False)
        return 130
    except (ConfigError, SetupError, FileNotFoundError, ValueError) as err:
        return _error(err)


if __name__ == "__main__":
    sys.exit(main())
