"""The ``apf-ray`` command line: a thin layer over the run API (:func:`apf_ray.run.run`).

Only the standard library is imported at module level, so ``apf-ray --help`` answers at once
(no torch, Ray, pydantic or rich); each command imports what it needs. The backend is chosen
by name, so this package never imports Ray or ``actors`` itself.

Output levels: by default a progress bar per run, pool events, the summary; ``--quiet`` only
errors and the final summary table; ``--verbose`` adds Ray's own logs (start-up, workers).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apf_ray.errors import RunStopped, SetupError, Stopped, describe

if TYPE_CHECKING:
    from rich.console import Console

    from apf_ray.callbacks import Callback
    from apf_ray.config import ExperimentConfig
    from apf_ray.resume import ResumePoint

DESCRIPTION = ("Federated learning with Adaptive Parameter Freezing (APF), on a local or remote Ray cluster "
               "or in-process. Run one training, or several strategies side by side.")


@functools.cache
def console() -> Console:
    """The terminal console. Logs and CI are not terminals: give tables room (140 columns) there."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 140)


@functools.cache
def error_console() -> Console:
    """Standard error, where errors go (so ``apf-ray ... > out.txt`` still shows them)."""
    from rich.console import Console

    return Console(stderr=True, width=None if sys.stderr.isatty() else 140)


def _say(args: argparse.Namespace, message: str) -> None:
    """An informational line, left out by ``--quiet``."""
    if not args.quiet:
        console().print(message)


def _log_level(args: argparse.Namespace) -> int:
    """apf-ray's own warnings (e.g. a pool no node can place) show unless ``--quiet``."""
    return logging.ERROR if args.quiet else logging.WARNING


def _backend(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    return ("inprocess", {}) if args.inprocess else ("ray", {"address": args.address, "verbose": args.verbose})


def _note(text: str) -> None:
    """A line about the user's options (ignored, replaced, refused), shown even with ``--quiet``."""
    from rich.markup import escape

    console().print(f"[yellow]note:[/yellow] {escape(text)}", soft_wrap=True, highlight=False)


def _report_ignored(args: argparse.Namespace, cfg: ExperimentConfig) -> None:
    """Say which given options have no effect, instead of dropping them silently."""
    if args.inprocess and args.address:
        _note(f"--address {args.address} is ignored with --inprocess (no Ray cluster is used)")
    if args.inprocess and cfg.cluster.address:
        _note(f"cluster.address {cfg.cluster.address} is ignored with --inprocess")
    if args.output and cfg.output.dir and Path(args.output) != Path(cfg.output.dir):
        _note(f"--output {args.output} replaces output.dir {cfg.output.dir} of the config")


def _claim(args: argparse.Namespace, folder: str | Path) -> None:
    """Hold ``folder`` (:class:`apf_ray.outputs.OutputClaim`: one writer at a time, checked writable) until
    the command returns, however it returns; a run's own folder is claimed by the run itself."""
    from apf_ray.outputs import OutputClaim

    args.claims.enter_context(OutputClaim(folder))


def _replaced_notice(run_dir: Path) -> Callback:
    """A callback saying what ``--overwrite`` removed, once the new run has started (even with --quiet)."""
    from apf_ray.callbacks import Callback, RunContext

    class ReplacedNotice(Callback):
        def on_start(self, ctx: RunContext) -> None:
            if ctx.info.get("replaced"):
                _note(f"--overwrite removed the earlier run's {', '.join(ctx.info['replaced'])} from {run_dir}")

    return ReplacedNotice()


def _train(cfg: ExperimentConfig, run_dir: Path, args: argparse.Namespace, label: str, resume=None, *,
           overwrite: bool = False) -> dict:
    from apf_ray.progress import ProgressDisplay
    from apf_ray.run import run

    display = None if args.quiet else ProgressDisplay(console(), label)
    callbacks: list[Callback] = [_replaced_notice(run_dir), *([display] if display else [])]
    backend, options = _backend(args)
    try:
        return run(cfg, run_dir, backend=backend, backend_options=options, callbacks=callbacks, resume=resume,
                   overwrite=overwrite)
    finally:
        if display is not None:
            display.close()


def _no_aggregation(summary: dict, label: str) -> str | None:
    """The error line for a run in which no round aggregated (the model never moved), else None."""
    rounds = summary.get("rounds", 0)
    if rounds == 0 or summary.get("rounds_not_aggregated", 0) < rounds:
        return None
    return (f"{label}: none of its {rounds} round(s) aggregated — every round missed its quorum or was "
            f"discarded ({summary.get('clients_rejected', 0)} upload(s) rejected, "
            f"{summary.get('clients_dropped', 0)} client(s) dropped); the model is the initial one. "
            f"Why, per round and client: {summary.get('run_dir', 'the run folder')}/rounds.parquet, clients.parquet")


def _finished_summary(run_dir: Path, rounds_done: int, rounds: int) -> dict | None:
    """The summary of a run that already did its ``rounds`` (None if it must train further)."""
    path = run_dir / "summary.json"
    if rounds_done < rounds or not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("rounds") == rounds_done else None


def _note_damaged(resume: ResumePoint) -> None:
    """Say which newer checkpoints were damaged and which one a resume uses instead."""
    for path, reason in resume.skipped:
        _note(f"checkpoint {path.name} is damaged ({reason}); using {resume.path.name}")


def _resume_config(args: argparse.Namespace) -> tuple[ExperimentConfig, Path, ResumePoint]:
    """The checkpointed run's config with the allowed ``--set`` changes; errors name the option or field."""
    from apf_ray.config import ConfigError, build_config
    from apf_ray.resume import check_resume_config, load_resume_point

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
    _note_damaged(resume)
    cfg = build_config(resume.config, args.set or [], source=f"{run_dir} + --set")
    check_resume_config(resume.config, cfg, resume.round, asked_by="--set asks")
    return cfg, run_dir, resume


def cmd_train(args: argparse.Namespace) -> int:
    from apf_ray.config import load_config
    from apf_ray.report import summary_table
    from apf_ray.run import default_run_dir

    resume = None
    if args.resume:
        cfg, run_dir, resume = _resume_config(args)
        _report_ignored(args, cfg)
        summary = _finished_summary(run_dir, resume.round, cfg.train.rounds)
        if summary is not None:  # nothing to train: no backend, no Ray
            _say(args, f"{run_dir} is finished ({resume.round} rounds); raise train.rounds "
                       f"(--set train.rounds=N) to continue it")
            console().print(summary_table(summary, title=f"{cfg.name} · {cfg.strategy.name}"))
            return 0
        _say(args, f"resuming {run_dir} after round {resume.round}")
    else:
        cfg = load_config(args.config, args.set or [])
        run_dir = Path(args.output) if args.output else default_run_dir(cfg)
        _report_ignored(args, cfg)
    summary = _train(cfg, run_dir, args, cfg.name, resume, overwrite=args.overwrite)
    console().print(summary_table(summary, title=f"{cfg.name} · {cfg.strategy.name}"))
    if cfg.output.tensorboard:
        _say(args, f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    failed = _no_aggregation(summary, f"the run in {run_dir}")
    return _failure(failed) if failed else 0


def _compare_resume(args: argparse.Namespace) -> tuple[ExperimentConfig, list[str], Path]:
    """The stopped comparison's saved base config and variants; errors name the refused option."""
    from apf_ray.config import ConfigError, build_config
    from apf_ray.variants import load_plan

    out = Path(args.resume)
    given = [flag for flag, value in (("--config", args.config), ("--set", args.set),
                                      ("--strategies", args.strategies), ("--overwrite", args.overwrite)) if value]
    if given:
        raise ConfigError(f"{' and '.join(given)} cannot be used with --resume: the comparison in {out} keeps the "
                          "config and variants it started with")
    if args.output and Path(args.output).resolve() != out.resolve():
        raise ConfigError(f"--output {args.output} differs from --resume {out}: a resumed comparison continues "
                          "in its own folder")
    config, strategies = load_plan(out)
    return build_config(config, source=f"{out} (saved comparison)"), strategies, out


def _variant_state(run_dir: Path, cfg: ExperimentConfig) -> tuple[dict | None, ResumePoint | None]:
    """A resumed comparison's variant: (its summary, None) if finished, (None, its checkpoint) if
    stopped, (None, None) to train it from the start (it stopped before its first checkpoint)."""
    from apf_ray.outputs import clear_run
    from apf_ray.resume import load_resume_point

    try:
        resume = load_resume_point(run_dir)
    except FileNotFoundError:
        clear_run(run_dir)  # this comparison's own partial outputs, nothing else
        return None, None
    _note_damaged(resume)
    summary = _finished_summary(run_dir, resume.round, cfg.train.rounds)
    if summary is not None and summary.get("config") != cfg.to_dict():
        raise SetupError(f"{run_dir} holds a run of another config than its comparison saved; move it away "
                         "to train the variant again")
    return summary, (None if summary else resume)


def cmd_compare(args: argparse.Namespace) -> int:
    from apf_ray.backends import backend_class
    from apf_ray.config import build_config, load_config
    from apf_ray.metrics import plot_history, read_history, write_json
    from apf_ray.outputs import clear_run, record, refuse_search, run_files
    from apf_ray.report import comparison_rows, comparison_table
    from apf_ray.run import default_run_dir
    from apf_ray.stops import StopSignals
    from apf_ray.variants import DEFAULT_STRATEGIES, PLAN_FILE, save_plan, variant_dirname, variant_overrides

    if args.resume:
        base, strategies, out = _compare_resume(args)
    else:
        base = load_config(args.config, args.set or [])
        strategies = args.strategies or list(DEFAULT_STRATEGIES)
        out = Path(args.output) if args.output else default_run_dir(base)
    _report_ignored(args, base)
    variants = {  # every variant is validated before any run starts
        spec: build_config(base.to_dict(), variant_overrides(spec, base.strategy.name), source=f"variant {spec}")
        for spec in strategies
    }
    _claim(args, out)  # one compare per folder; each variant's run claims its own sub-folder
    refuse_search(out)
    if not args.resume:
        taken = [d for d in (out, *(out / variant_dirname(spec) for spec in variants)) if run_files(d)]
        if taken and not args.overwrite:
            resumable = f"continue it with --resume {out}, " if (out / PLAN_FILE).is_file() else ""
            raise SetupError(f"{', '.join(map(str, taken))} already hold(s) a run or comparison; {resumable}"
                             "replace it with --overwrite, or choose another --output")
    resume_with = f"apf-ray compare --resume {out}"
    results: dict[str, dict[str, Any]] = {}
    histories = {}
    stopped: Stopped | None = None
    planned = bool(args.resume)  # whether --resume has a plan to follow
    backend, options = _backend(args)
    try:
        # Outside a variant's run (Ray starting, between variants, writing the comparison) a signal stops
        # at once: nothing is in flight. Inside, the run's own handlers checkpoint the round in flight.
        # Ray: one cluster for every variant.
        with StopSignals() as stops, backend_class(backend).session(base, **options):
            if not args.resume:
                if args.overwrite and run_files(out):
                    _note(f"--overwrite removed the earlier comparison's {', '.join(clear_run(out))} from {out}")
                record(out, save_plan(out, base.to_dict(), strategies))
                planned = True
            for i, (spec, cfg) in enumerate(variants.items(), 1):
                run_dir = out / variant_dirname(spec)
                summary, resume = _variant_state(run_dir, cfg) if args.resume else (None, None)
                if summary is not None:
                    _say(args, f"[bold]variant {i}/{len(variants)}:[/bold] {spec} (finished, reused)")
                else:
                    _say(args, f"[bold]variant {i}/{len(variants)}:[/bold] {spec}"
                               + (f" (resuming after round {resume.round})" if resume else ""))
                    try:
                        summary = _train(cfg, run_dir, args, spec, resume, overwrite=args.overwrite)
                    except RunStopped as stop:
                        stopped = stop.within(resume_with, f"variant {spec}")
                        raise stopped from None
                results[spec] = summary
                histories[spec] = read_history(run_dir)
            rows = comparison_rows(results)
            record(out, "compare.json", "compare.png", *(variant_dirname(spec) for spec in variants))
            write_json(out / "compare.json", {"rows": rows, "config": base.to_dict()})
            plot = plot_history(out / "compare.png", histories,
                                title=f"{out.name}: {base.name}, {base.train.rounds} rounds, strategies side by side")
    except KeyboardInterrupt as stop:  # a first signal outside a run, or a second while the stopped one closes Ray
        name = signal.Signals(stops.signal_of(stop)).name
        between = (f"stopped by {name} with {len(results)} of {len(variants)} variants finished; resume with "
                   f"{resume_with}" if planned else f"stopped by {name} before any variant started; nothing to resume")
        raise stopped or Stopped(stops.signal_of(stop), between) from None
    console().print(comparison_table(rows, title=f"{base.name}: {base.train.rounds} rounds, "
                                                  f"{base.train.clients_per_round} clients/round"))
    _say(args, f"wrote {out / 'compare.json'} and {plot}")
    failed = [line for spec in results if (line := _no_aggregation(results[spec], f"variant {spec}"))]
    return _failure(*failed) if failed else 0


def cmd_tune(args: argparse.Namespace) -> int:
    from datetime import datetime

    from apf_ray.plugins import import_object
    from apf_ray.tuning import SEARCH_DRIVER, load_tune_spec

    if args.resume:
        if args.config or args.set:
            raise ValueError("--resume continues the search as it was saved; drop --config and --set")
        from apf_ray.outputs import check_search_folder

        check_search_folder(Path(args.resume))  # before the claim, which would create a mistyped folder
        _claim(args, args.resume)  # the driver holds the search folder; its trials write inside it
        resume_search = import_object(SEARCH_DRIVER["resume"], "search driver")  # the Ray layer, by path
        resume_search(Path(args.resume), address=args.address, verbose=args.verbose, quiet=args.quiet,
                      console=console())
        return 0
    if not args.config:
        raise ValueError("apf-ray tune needs --config tune_configs/NAME.yaml (or --resume DIR)")
    spec, base = load_tune_spec(args.config, args.set or [])
    output = Path(args.output) if args.output else Path("runs") / f"tune-{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
    _claim(args, output)
    run_search = import_object(SEARCH_DRIVER["run"], "search driver")
    run_search(spec, base, output, address=args.address, verbose=args.verbose, quiet=args.quiet, console=console())
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from apf_ray.config import ConfigError
    from reproduce import reproduce, saved_options

    if args.resume:  # the invocation saved in DIR, again (--jobs may differ)
        given = [flag for flag, value in (("--quick", args.quick), ("--only", args.only), ("--cifar10", args.cifar10),
                                          ("--tuned", args.tuned)) if value]
        if given:
            raise ConfigError(f"{' and '.join(given)} cannot be used with --resume: it repeats the invocation "
                              f"saved in {args.resume}")
        if args.output and Path(args.output).resolve() != Path(args.resume).resolve():
            raise ConfigError(f"--output {args.output} differs from --resume {args.resume}")
        options = saved_options(args.resume)
        output = args.resume
    else:
        options = {"quick": args.quick, "only": args.only, "cifar10": args.cifar10, "tuned": args.tuned}
        output = args.output or ("runs/reproduce-quick" if args.quick else "runs/reproduce")
    options["jobs"] = args.jobs if args.jobs is not None else options.get("jobs", 2)
    command = "apf-ray " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["reproduce"] else "apf-ray reproduce"
    result = reproduce(output, **options, report_only=args.report_only, command=command,
                       say=(lambda _: None) if args.quiet else console().print,
                       claim=functools.partial(_claim, args))  # each run's worker claims its own run folder
    return 1 if result["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apf-ray", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (default: the digits + LeNet-5 + APF workload, "
                                         "configs/digits-lenet5.yaml)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field, repeatable")
        sp.add_argument("--address", help="existing Ray cluster address (default: start a local one)")
        sp.add_argument("--output", help="run directory (refused if it holds a run, unless --overwrite, or a "
                                         "search, or another command is writing it)")
        sp.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --output (the files it listed as its own; others stay)")
        sp.add_argument("--inprocess", action="store_true", help="reference loop in this process, no Ray")
        level = sp.add_mutually_exclusive_group()
        level.add_argument("--quiet", action="store_true", help="print only errors and the final summary")
        level.add_argument("--verbose", action="store_true", help="also show Ray's own logs")

    t = sub.add_parser("train", help="run one federated training", description="Run one federated training.")
    common(t)
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="run several strategies on the same workload, side by side",
                       description="Run several strategies on the same workload and cluster, side by side.")
    common(c)
    c.add_argument("--strategies", nargs="+",
                   help="variants 'name[:key=value,...][+stage[:key=value,...]]'; the first is the baseline "
                        "(default: fedavg apf apf:aggressive_prob=0.3)")
    c.add_argument("--resume", metavar="DIR", help="finish the stopped comparison in DIR (its saved config and "
                                                   "variants; finished variants are reused)")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("tune", help="search APF's knobs with Ray Tune (each trial a federated run)")
    s.add_argument("--config", help="search file, e.g. tune_configs/tiny.yaml")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the search file")
    s.add_argument("--address", help="existing Ray cluster address (default: start a local one)")
    s.add_argument("--output", help="output folder (default runs/tune-<name>-<time>)")
    s.add_argument("--resume", metavar="DIR", help="finish the interrupted search in DIR")
    level = s.add_mutually_exclusive_group()
    level.add_argument("--quiet", action="store_true", help="no live trial table; errors and the final table")
    level.add_argument("--verbose", action="store_true", help="also show Ray's own logs")
    s.set_defaults(func=cmd_tune)

    r = sub.add_parser("reproduce", help="run the paper's experiments at this machine's scale; write a report",
                       description="Run the paper's experiments (Tables I-III, Figs. 1-3, 5/6, 12-14) at the scale "
                                   "this machine allows and write OUTPUT/report.md with PNG plots and "
                                   "OUTPUT/reproduce.json. Finished runs in OUTPUT are reused; an interrupted "
                                   "run resumes from its last checkpoint.")
    r.add_argument("--quick", action="store_true", help="toy scale, every experiment in minutes (not evidence)")
    r.add_argument("--only", nargs="+", metavar="NAME",
                   help="only these experiments: lenet5 lstm resnet18 gap strawmen baselines rivals periods "
                        "threshold overhead stability")
    r.add_argument("--output", help="output folder (default runs/reproduce, or runs/reproduce-quick)")
    r.add_argument("--jobs", type=int, help="runs trained at a time, each in its own process (2)")
    r.add_argument("--cifar10", metavar="DIR", help="CIFAR-10 python batches for ResNet-18 (default "
                                                    "data/cifar-10-batches-py; else Fashion-MNIST as 3x32x32)")
    r.add_argument("--tuned", metavar="FILE", help="Ray Tune result whose best APF settings get a run "
                                                   "(default docs/results/tune_fashion_mnist.json)")
    r.add_argument("--report-only", action="store_true", help="train nothing; rebuild the report from OUTPUT")
    r.add_argument("--resume", metavar="DIR", help="continue the stopped invocation saved in DIR (its --quick, "
                                                   "--only, --cifar10, --tuned; finished runs are reused)")
    r.add_argument("--quiet", action="store_true", help="print only errors")
    r.set_defaults(func=cmd_reproduce, verbose=False)
    return p


def _print_errors(*lines: str) -> None:
    """``error: ...`` per line, on standard error."""
    from rich.markup import escape

    for line in lines:
        error_console().print(f"[red]error:[/red] {escape(line)}", soft_wrap=True, highlight=False)


def _failure(*lines: str) -> int:
    """A run that finished without a result: its error lines, exit status 1."""
    _print_errors(*lines)
    return 1


def _error(err: BaseException) -> int:
    """Exit status 2 with one ``error:`` line per problem (a config error lists each field's)."""
    from apf_ray.config import ConfigError

    lines = [line for line in str(err).splitlines() if line.strip()] if isinstance(err, ConfigError) else []
    _print_errors(*(lines or [describe(err)]))
    return 2


def main(argv: list[str] | None = None, *, as_program: bool = False) -> int:
    """Exit status: 0 done, 1 a run finished in which no round aggregated (its summary is written),
    2 a usage, config, data, checkpoint or cluster error (one ``error:`` line per problem, on
    standard error), 130 / 143 stopped by SIGINT / SIGTERM (resumable from the printed folder).

    ``as_program``: this is the ``apf-ray`` process (:func:`program`), so once a command has
    stopped, later SIGINT/SIGTERM are ignored while it says so and exits: everything is saved,
    and a second Ctrl-C that comes after the stop finished must not kill the exit midway.
    """
    args = build_parser().parse_args(argv)
    from apf_ray.config import ConfigError

    logger = logging.getLogger("apf_ray")
    previous = logger.level
    logger.setLevel(_log_level(args))  # restored on return: main() also runs inside tests and notebooks
    try:
        with contextlib.ExitStack() as claims:
            args.claims = claims  # output folders the command claims (_claim), released when it returns
            return args.func(args)
    except Stopped as stop:
        from rich.markup import escape

        if as_program:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        console().print(f"[yellow]{escape(stop.message)}", soft_wrap=True, highlight=False)
        return stop.exit_code
    except KeyboardInterrupt:
        console().print("[yellow]interrupted", highlight=False)
        return 130
    except (ConfigError, SetupError, FileNotFoundError, ValueError) as err:
        return _error(err)
    finally:
        logger.setLevel(previous)


def program() -> None:
    """The ``apf-ray`` executable (and ``python -m apf_ray.cli``): :func:`main`, then exit with its status.

    A signal in the moment between a stopped run restoring the default handlers and
    :func:`main` reporting the stop is a stop too: exit 130 without a traceback.
    """
    try:
        code = main(as_program=True)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    program()
