"""``apf-ray`` command line: train one run, or compare strategies side by side.

Ray is imported lazily (from ``actors/``) so the core stays Ray-free and ``--inprocess``
runs the reference loop without a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from apf_ray.config import ConfigError, ExperimentConfig, build_config, load_config
from apf_ray.federation import RoundRecord
from apf_ray.metrics import plot_history
from apf_ray.report import comparison_rows, comparison_table, summary_table, variant_overrides
from apf_ray.run import default_run_dir, load_checkpoint, run_inprocess

# Logs and CI are not terminals; give tables room instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)


def _round_line(rec: RoundRecord) -> str:
    acc = "—" if math.isnan(rec.test_accuracy) else f"{rec.test_accuracy:.3f}"
    return (f"acc {acc} · frozen {rec.frozen_fraction:.0%} · up {rec.cum_bytes_up / 1e6:.2f} MB · "
            f"clients {rec.clients_reported}/{rec.clients_sampled}")


def _execute(cfg: ExperimentConfig, run_dir: Path, *, inprocess: bool, address: str | None,
             resume_state: dict | None, label: str, quiet: bool) -> dict[str, Any]:
    done = resume_state["round"] if resume_state else 0
    with Progress(TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console,
                  disable=quiet, transient=False) as progress:
        task = progress.add_task("train", total=cfg.train.rounds, completed=done, label=label, status="starting")

        def on_round(rec: RoundRecord, events: list[str] = ()) -> None:
            for e in events:
                progress.console.print(f"[yellow]round {rec.round}: {e}")
            if rec.clients_dropped:
                progress.console.print(f"[yellow]round {rec.round}: {rec.clients_dropped} client(s) dropped")
            progress.update(task, completed=rec.round, status=_round_line(rec))

        if inprocess:
            return run_inprocess(cfg, run_dir, resume_state=resume_state, on_round=on_round)
        from actors.driver import train_on_ray

        def on_start(info: dict) -> None:
            pools = ", ".join(f"{name}: {len(members)} actor(s)" for name, members in info["pools"].items())
            progress.update(task, status=f"cluster ready ({pools})")

        return train_on_ray(cfg, run_dir, resume_state=resume_state, address=address,
                            on_start=on_start, on_round=on_round)


def cmd_train(args: argparse.Namespace) -> int:
    resume_state = None
    if args.resume:
        cfg, resume_state = load_checkpoint(Path(args.resume))
        if args.set:
            cfg = build_config(cfg.model_dump(mode="json"), args.set, source=f"{args.resume} + --set")
        run_dir = Path(args.resume)
        console.print(f"resuming {run_dir} after round {resume_state['round']}")
    else:
        cfg = load_config(args.config, args.set or [])
        run_dir = Path(args.output) if args.output else default_run_dir(cfg)
    summary = _execute(cfg, run_dir, inprocess=args.inprocess, address=args.address,
                       resume_state=resume_state, label=cfg.name, quiet=args.quiet)
    console.print(summary_table(summary, title=f"{cfg.name} · {cfg.strategy.name}"))
    console.print(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    base = load_config(args.config, args.set or [])
    out = Path(args.output) if args.output else default_run_dir(base)
    variants = {spec: load_config(args.config, [*(args.set or []), *variant_overrides(spec), f"name={base.name}"])
                for spec in args.strategies}  # every variant validated before any run starts
    results: dict[str, dict[str, Any]] = {}
    histories = {}
    with contextlib.ExitStack() as cluster:
        if not args.inprocess:  # one cluster for all variants
            from actors.driver import ray_session

            cluster.enter_context(ray_session(base, args.address))
        for spec, cfg in variants.items():
            run_dir = out / spec.replace(":", "_").replace(",", "_").replace("=", "-")
            results[spec] = _execute(cfg, run_dir, inprocess=args.inprocess, address=args.address,
                                     resume_state=None, label=spec, quiet=args.quiet)
            _, state = load_checkpoint(run_dir)
            histories[spec] = [RoundRecord(**h) for h in state["history"]]
    rows = comparison_rows(results)
    console.print(comparison_table(rows, title=f"{base.name}: {base.train.rounds} rounds, "
                                                f"{base.train.clients_per_round} clients/round"))
    (out / "compare.json").write_text(json.dumps({"rows": rows, "config": base.model_dump(mode="json")},
                                                 indent=2, default=float))
    plot = plot_history(out, histories, "compare.png")
    console.print(f"wrote {out / 'compare.json'} and {plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apf-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (default: built-in digits + LeNet-5 + APF)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, repeatable")
        sp.add_argument("--address", help="existing Ray cluster address (default: start a local one)")
        sp.add_argument("--output", help="run directory")
        sp.add_argument("--inprocess", action="store_true", help="reference loop in this process, no Ray")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="run one federated training")
    common(t)
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="run several strategies on the same workload, side by side")
    common(c)
    c.add_argument("--strategies", nargs="+", default=["fedavg", "apf", "apf:aggressive_prob=0.3"],
                   help="variants 'name[:key=value,...]'; the first is the baseline for savings")
    c.set_defaults(func=cmd_compare)
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
