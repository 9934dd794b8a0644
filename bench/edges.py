"""What happens when a user reaches an edge: each case run as a real ``apf-ray`` command.

Each case runs ``apf-ray ...`` (this checkout's, as ``python -m apf_ray.cli``) in its own
folder under a temporary directory, as a newcomer would type it: a stop at any moment, two
commands on one folder, a bad path or name, a dead address, a pool the machine cannot hold, a
config that is not one. Every command is bounded by a timeout (then every process it started
is killed by PID and the case reads ``timed out``). Recorded per case: the command (the
temporary directory shown as ``$TMP``), the exit status, the ``error:`` or stop line it
printed (stderr first; else a traceback's last line, else its last line), what it left (the
case's own check), the seconds it took (for a signal, from the last signal to the exit) and
any process that outlived it (killed afterwards). Only loopback addresses are used.

Writes ``docs/results/edges.json`` (with ``--only``, the cases run replace theirs and the
others stay) and prints the table; ``python3 bench/readme_tables.py`` renders the README's
"What happens when..." section from it.

    python3 bench/edges.py [--only NAME ...] [--json docs/results/edges.json] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provenance import RESULTS, LoadSampler, code, command, machine, now
from readme_tables import edge_table

REPO = Path(__file__).resolve().parent.parent
SEARCH_FILE = REPO / "tune_configs" / "tiny.yaml"
TRAIN_FILE = REPO / "configs" / "digits-lenet5.yaml"
UNREACHABLE = "127.0.0.1:1"  # a loopback port where nothing listens
TINY = {  # the default workload cut down: 6 clients, 3 a round, one actor; rounds of about a second
    "name": "tiny",
    "data": {"dataset": "digits", "partitioner": "shards", "num_clients": 6,
             "partition_options": {"shards_per_client": 2}},
    "train": {"rounds": 12, "clients_per_round": 3, "local_steps": 15, "batch_size": 16},
    "cluster": {"pools": [{"name": "cpu", "num_actors": 1, "num_cpus": 1}]},
    "output": {"checkpoint_every": 5, "tensorboard": False, "plots": False},
}
BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"]
                 + [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                    for p, c in zip("abcdefgh", "bcdefghi", strict=True)]) + "\n"
"""A YAML "billion laughs": a few hundred bytes that expand to 9**9 strings."""


@dataclass
class Result:
    """One finished (or timed-out) command."""

    command: str
    exit: int | None  # None: timed out and killed
    seconds: float  # start to exit
    stop_s: float | None  # last signal to exit
    stdout: str
    stderr: str
    leftover: int  # processes it started that outlived it (then killed)


@dataclass
class Work:
    """The temporary directory and what several cases share (built on first use)."""

    root: Path
    tiny: Path = field(init=False)
    _finished: Path | None = None

    def __post_init__(self) -> None:
        import yaml

        self.tiny = self.root / "tiny.yaml"
        self.tiny.write_text(yaml.safe_dump(TINY, sort_keys=False))

    def show(self, text: str) -> str:
        """Paths as a reader can follow them: the temporary directory as $TMP, the checkout's relative;
        a run of 20 or more of one character as ``xxx…(300 x)``."""
        text = text.replace(str(self.root), "$TMP").replace(f"{REPO}/", "")
        return re.sub(r"(\w)\1{19,}", lambda m: f"{m.group(1) * 3}…({len(m.group(0))} {m.group(1)})", text)

    def finished_run(self) -> Path:
        """A finished 2-round in-process run, to copy into the cases that need one."""
        if self._finished is None:
            self._finished = self.root / "finished"
            res = apf_ray(self, ["train", "--inprocess", "--quiet", "--config", str(self.tiny), "--set",
                                 "train.rounds=2", "--output", str(self._finished)], timeout_s=300)
            if res.exit != 0:
                raise RuntimeError(f"could not prepare a finished run: {res.stderr or res.stdout}")
        return self._finished

    def copy_of_finished(self, folder: Path) -> Path:
        return Path(shutil.copytree(self.finished_run(), folder))


# ---------------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, session id, start time in clock ticks) of a live process; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[3]), int(fields[19])


def _family(root: int, seen: dict[int, int]) -> None:
    """Add to ``seen`` (pid → start time) every live process in ``root``'s session or below it."""
    table = {int(e): s for e in os.listdir("/proc") if e.isdigit() and (s := _proc_stat(int(e)))}
    for pid, (_, sid, start) in table.items():
        if sid == root:
            seen[pid] = start
    grew = True
    while grew:  # descendants in sessions of their own (apf-ray reproduce's workers)
        grew = False
        for pid, (ppid, _, start) in table.items():
            if ppid in seen and pid not in seen:
                seen[pid], grew = start, True


def _alive(seen: dict[int, int]) -> list[int]:
    """The processes of ``seen`` still running (the same process: its start time matches)."""
    return [pid for pid, start in seen.items() if (s := _proc_stat(pid)) and s[2] == start]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def apf_ray(work: Work, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout_s: float = 120, ready: Callable[[], bool] | None = None, signals: tuple[int, ...] = (),
            group: bool = False, memory_gb: float | None = None, shown: str | None = None) -> Result:
    """Run ``apf-ray ARGS`` in its own session; once ``ready()`` holds, send ``signals`` (1 s apart; to
    the process group with ``group``, as a terminal's Ctrl-C does). Kill all it started on timeout."""
    cwd = cwd or work.root
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update({"PYTHONPATH": str(REPO), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, **(env or {}))

    def limit() -> None:  # a bounded address space: a config that expands without end fails, not the machine
        if memory_gb:
            size = int(memory_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (size, size))

    with tempfile.TemporaryFile("w+", errors="replace") as out, tempfile.TemporaryFile("w+", errors="replace") as err:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "apf_ray.cli", *args], cwd=cwd, env=full_env, stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=limit)
        seen: dict[int, int] = {}
        last_signal = _drive(proc, seen, start + timeout_s, ready, list(signals), group)
        timed_out = proc.poll() is None
        if timed_out:
            _family(proc.pid, seen)
            _kill(_alive(seen))
        proc.wait()
        end = time.monotonic()
        deadline = end + 15  # the cluster a driver started goes down with it, not at once
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftover = _alive(seen)
        _kill(leftover)
        out.seek(0)
        err.seek(0)
        return Result(shown or "apf-ray " + shlex.join(args), None if timed_out else proc.returncode,
                      round(end - start, 1), None if last_signal is None else round(end - last_signal, 1),
                      out.read(), err.read(), len(leftover))


def _drive(proc: subprocess.Popen, seen: dict[int, int], deadline: float, ready: Callable[[], bool] | None,
           signals: list[int], group: bool) -> float | None:
    """Wait for ``proc`` until ``deadline``, noting its processes, signalling it once ``ready``; the last
    signal's time."""
    last_signal = None
    while proc.poll() is None and time.monotonic() < deadline:
        _family(proc.pid, seen)
        if signals and (ready is None or ready()):
            (os.killpg if group else os.kill)(proc.pid, signals.pop(0))
            last_signal = time.monotonic()
        time.sleep(1.0 if signals and last_signal else 0.1)  # 1 s: a person pressing Ctrl-C again
    return last_signal


def _rounds(n: int) -> str:
    return f"{n} round{'' if n == 1 else 's'}"


def _journal_rounds(run_dir: Path) -> int:
    path = run_dir / "journal" / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def after_rounds(run_dir: Path, rounds: int = 2) -> Callable[[], bool]:
    """Ready once ``run_dir``'s journal has ``rounds`` rounds: the run has demonstrably started."""
    return lambda: _journal_rounds(run_dir) >= rounds


def _said(res: Result) -> str:
    """The line a user reads: an ``error:`` or stop line (stderr first), else a ``note:``, a traceback's
    last line, a crash dump's first line, ``finished`` (exit 0), the last line."""
    for prefixes in (("error:", "stopped", "abandoned", "interrupted"), ("note:",)):
        for text in (res.stderr, res.stdout):
            for line in text.splitlines():
                if line.startswith(prefixes):
                    return line.strip()
    both = res.stderr + res.stdout
    if "Traceback" in both:
        tail = [line for line in both[both.rindex("Traceback"):].splitlines() if line.strip()]
        return f"traceback: {tail[-1].strip()}"
    dump = [line for line in both.splitlines() if "*** " in line]  # a C++ fatal-signal dump (Ray's)
    if dump:
        return f"crash dump ({len(both.splitlines())} lines): {dump[0][dump[0].index('*** '):].strip()}"
    if res.exit == 0:
        return "finished"
    lines = [line.strip() for line in (res.stderr or res.stdout).splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing)"


# ---------------------------------------------------------------------------------------- the cases
@dataclass
class Case:
    name: str
    when: str  # "... you press Ctrl-C during apf-ray train"
    run: Callable[[Work, Path], tuple[Result, str]]  # → the result and what the case found on disk


CASES: dict[str, Case] = {}


def case(name: str, when: str) -> Callable[[Callable], Callable]:
    def register(fn: Callable[[Work, Path], tuple[Result, str]]) -> Callable:
        CASES[name] = Case(name, when, fn)
        return fn
    return register


def _checkpoint(run_dir: Path) -> str:
    checkpoints = sorted((run_dir / "checkpoints").glob("round-*"))
    return f"last checkpoint round {int(checkpoints[-1].name.split('-')[1])}" if checkpoints else "no checkpoint"


def _stopped_train(work: Work, folder: Path, signals: tuple[int, ...], group: bool, local_steps: int = 15):
    """``apf-ray train`` on Ray, signalled after its first rounds (after one when two signals come)."""
    run_dir = folder / "run"
    twice = len(signals) > 1  # then a checkpoint every round: the second signal leaves one to resume from
    res = apf_ray(work, ["train", "--quiet", "--config", str(work.tiny), "--set", f"train.local_steps={local_steps}",
                         *(["--set", "output.checkpoint_every=1"] if twice else []), "--output", str(run_dir)],
                  ready=after_rounds(run_dir, 1 if twice else 2),
                  signals=signals, group=group, timeout_s=300)
    return res, f"{_rounds(_journal_rounds(run_dir))} in the journal, {_checkpoint(run_dir)}"


def _stopped_compare(work: Work, folder: Path, signals: tuple[int, ...], group: bool):
    """``apf-ray compare`` on Ray, signalled once its second variant trains."""
    out = folder / "cmp"
    res = apf_ray(work, ["compare", "--quiet", "--config", str(work.tiny), "--strategies", "fedavg", "apf",
                         "--output", str(out)], ready=after_rounds(out / "apf"), signals=signals, group=group,
                  timeout_s=300)
    wrote = "wrote compare.json" if (out / "compare.json").exists() else "no compare.json"
    return res, f"{wrote}; variant apf: {_checkpoint(out / 'apf')}"


def _stopped_tune(work: Work, folder: Path, signals: tuple[int, ...], group: bool):
    """``apf-ray tune`` of the tiny search, signalled while its FedAvg baseline trains."""
    out = folder / "search"
    res = apf_ray(work, ["tune", "--quiet", "--config", str(SEARCH_FILE), "--output", str(out)],
                  ready=after_rounds(out / "baseline"), signals=signals, group=group, timeout_s=300)
    summary = out / "baseline" / "summary.json"
    baseline = json.loads(summary.read_text()) if summary.is_file() else {}
    kept = (f"baseline {baseline.get('rounds')} rounds{', marked stopped' if baseline.get('stopped') else ''}"
            if baseline else f"baseline: {_checkpoint(out / 'baseline')}")
    return res, f"{kept}; best.yaml {'written' if (out / 'best.yaml').exists() else 'not written'}"


def _stopped_reproduce(work: Work, folder: Path, signals: tuple[int, ...], group: bool):
    """``apf-ray reproduce --quick`` (four short runs, one at a time), signalled while the first trains."""
    out = folder / "rep"
    first = out / "runs" / "lenet5-fedavg"
    res = apf_ray(work, ["reproduce", "--quiet", "--quick", "--only", "strawmen", "--jobs", "1", "--output", str(out)],
                  ready=after_rounds(first), signals=signals, group=group, timeout_s=300)
    report = "wrote report.md" if (out / "report.md").exists() else "no report.md"
    return res, f"{report}; lenet5-fedavg: {_rounds(_journal_rounds(first))}, {_checkpoint(first)}"


def _signal_cases() -> None:
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) and SIGTERM (to the process) of each command."""
    for cmd, stop in (("train", _stopped_train), ("compare", _stopped_compare), ("tune", _stopped_tune),
                      ("reproduce", _stopped_reproduce)):
        for sig, group, how in ((signal.SIGINT, True, "press Ctrl-C"), (signal.SIGTERM, False, "send SIGTERM")):
            def run(work: Work, folder: Path, stop=stop, sig=sig, group=group) -> tuple[Result, str]:
                return stop(work, folder, (sig,), group)

            case(f"{cmd}-{sig.name.lower()}", f"you {how} during `apf-ray {cmd}` (once it trains)")(run)


_signal_cases()


@case("train-second-ctrl-c", "you press Ctrl-C twice during `apf-ray train` (long rounds)")
def _second_signal(work: Work, folder: Path):
    return _stopped_train(work, folder, (signal.SIGINT, signal.SIGINT), group=True, local_steps=400)


@case("two-trains-one-output", "a second `apf-ray train` starts on the --output the first one is writing")
def _two_trains(work: Work, folder: Path):
    run_dir = folder / "run"
    args = ["train", "--inprocess", "--quiet", "--config", str(work.tiny), "--output", str(run_dir)]
    first = subprocess.Popen([sys.executable, "-m", "apf_ray.cli", *args, "--set", "strategy.name=fedavg"],
                             cwd=folder, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while first.poll() is None and _journal_rounds(run_dir) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        res = apf_ray(work, args, timeout_s=300)
        first_exit = first.wait(timeout=300)
    finally:
        first.kill()
    strategy = json.loads((run_dir / "summary.json").read_text())["config"]["strategy"]["name"] \
        if (run_dir / "summary.json").is_file() else "none"
    return res, f"the first exited {first_exit}; summary.json is of the {strategy} run"


@case("overwrite-foreign-file", "--overwrite replaces a run whose folder also holds a file apf-ray never wrote")
def _overwrite_foreign(work: Work, folder: Path):
    run_dir = work.copy_of_finished(folder / "run")
    (run_dir / "journal" / "2026.txt").write_text("the user's notes\n")
    res = apf_ray(work, ["train", "--inprocess", "--quiet", "--config", str(work.tiny), "--set", "train.rounds=2",
                         "--output", str(run_dir), "--overwrite"], timeout_s=300)
    kept = (run_dir / "journal" / "2026.txt").is_file()
    return res, "journal/2026.txt kept" if kept else "journal/2026.txt DELETED"


@case("tune-onto-finished-run", "`apf-ray tune --output` names a folder holding a finished run")
def _tune_onto_run(work: Work, folder: Path):
    run_dir = work.copy_of_finished(folder / "run")
    before = (run_dir / "summary.json").read_bytes()
    res = apf_ray(work, ["tune", "--quiet", "--config", str(SEARCH_FILE), "--output", str(run_dir)], timeout_s=90)
    same = (run_dir / "summary.json").read_bytes() == before
    return res, "the run's summary.json unchanged" if same else "the run's summary.json REPLACED"


def _no_run_folder(path: Path) -> str:
    return "nothing written" if not path.exists() else f"{path.name} created"


@case("output-under-a-file", "--output is a path below a file (/etc/passwd/x)")
def _output_under_file(work: Work, folder: Path):
    res = apf_ray(work, ["train", "--config", str(work.tiny), "--output", "/etc/passwd/x"], timeout_s=120)
    return res, "—"


@case("output-is-a-file", "--output names an existing file")
def _output_is_file(work: Work, folder: Path):
    target = folder / "notes.txt"
    target.write_text("the user's notes\n")
    res = apf_ray(work, ["train", "--config", str(work.tiny), "--output", str(target)], timeout_s=120)
    return res, "the file unchanged" if target.read_text() == "the user's notes\n" else "the file CHANGED"


@case("name-with-dots", "the run's name is a path (--set name=../../x), no --output")
def _name_escapes(work: Work, folder: Path):
    cwd = folder / "a" / "b"
    cwd.mkdir(parents=True)
    res = apf_ray(work, ["train", "--inprocess", "--quiet", "--config", str(work.tiny), "--set", "train.rounds=1",
                         "--set", "name=../../x"], cwd=cwd, timeout_s=120)
    outside = [p for p in folder.rglob("x-*") if (cwd / "runs") not in p.parents]
    return res, (f"wrote {work.show(str(outside[0]))}, outside runs/" if outside else "nothing outside runs/")


@case("name-300-chars", "the run's name is 300 characters long")
def _long_name(work: Work, folder: Path):
    res = apf_ray(work, ["train", "--inprocess", "--quiet", "--config", str(work.tiny), "--set", "train.rounds=1",
                         "--set", "name=" + "x" * 300], cwd=folder, timeout_s=120)
    return res, _no_run_folder(folder / "runs")


@case("address-unreachable", f"--address names a port where nothing listens ({UNREACHABLE})")
def _address(work: Work, folder: Path):
    return apf_ray(work, ["train", "--quiet", "--config", str(work.tiny), "--address", UNREACHABLE,
                          "--output", str(folder / "run")], timeout_s=120), "—"


@case("stale-ray-address", f"RAY_ADDRESS={UNREACHABLE} is left in the environment from an old cluster")
def _stale_address(work: Work, folder: Path):
    res = apf_ray(work, ["train", "--quiet", "--config", str(work.tiny), "--output", str(folder / "run")],
                  env={"RAY_ADDRESS": UNREACHABLE}, timeout_s=120,
                  shown=f"RAY_ADDRESS={UNREACHABLE} apf-ray train --quiet --config $TMP/tiny.yaml "
                        "--output $TMP/stale-ray-address/run")
    return res, "—"


@case("pool-too-big-in-total", "the pool's actors each fit this machine but not all together")
def _pool(work: Work, folder: Path):
    actors = (os.cpu_count() or 2) + 2
    pool = f"cluster.pools=[{{name: cpu, num_actors: {actors}, num_cpus: 1}}]"
    res = apf_ray(work, ["train", "--quiet", "--config", str(work.tiny), "--set", pool, "--output",
                         str(folder / "run")], timeout_s=180)
    return res, f"{actors} actors × 1 CPU on {os.cpu_count()} CPUs; {_rounds(_journal_rounds(folder / 'run'))} done"


def _config_case(work: Work, folder: Path, args: list[str], memory_gb: float | None = None) -> tuple[Result, str]:
    run_dir = folder / "run"
    res = apf_ray(work, [*args, "--output", str(run_dir)], cwd=folder, timeout_s=120, memory_gb=memory_gb)
    return res, _no_run_folder(run_dir)


@case("unknown-config-key", "the config file misspells a key (train.rouns)")
def _unknown_key(work: Work, folder: Path):
    path = folder / "typo.yaml"
    path.write_text("train:\n  rouns: 3\n")
    return _config_case(work, folder, ["train", "--config", str(path)])


@case("search-file-to-train", "`apf-ray train` is given a search file")
def _search_to_train(work: Work, folder: Path):
    return _config_case(work, folder, ["train", "--config", str(SEARCH_FILE)])


@case("train-config-to-tune", "`apf-ray tune` is given a training config")
def _train_to_tune(work: Work, folder: Path):
    return _config_case(work, folder, ["tune", "--config", str(TRAIN_FILE)])


@case("empty-config", "the config file is empty")
def _empty(work: Work, folder: Path):
    path = folder / "empty.yaml"
    path.write_text("")
    return _config_case(work, folder, ["train", "--config", str(path)])


@case("yaml-alias-bomb", f"the config file is a YAML alias bomb ({len(BOMB)} bytes; run with 4 GB of memory)")
def _bomb(work: Work, folder: Path):
    path = folder / "bomb.yaml"
    path.write_text(BOMB)
    return _config_case(work, folder, ["train", "--config", str(path)], memory_gb=4)


@case("non-utf8-config", "the config file is not UTF-8 (Latin-1 `name: café`)")
def _latin1(work: Work, folder: Path):
    path = folder / "latin1.yaml"
    path.write_bytes("name: café\n".encode("latin-1"))
    return _config_case(work, folder, ["train", "--config", str(path)])


@case("tune-resume-not-a-search", "`apf-ray tune --resume` names a training run's folder")
def _tune_resume_run(work: Work, folder: Path):
    run_dir = work.copy_of_finished(folder / "run")
    return apf_ray(work, ["tune", "--quiet", "--resume", str(run_dir)], timeout_s=120), "—"


# ---------------------------------------------------------------------------------------- main
def run_case(work: Work, c: Case) -> dict[str, Any]:
    folder = work.root / c.name
    folder.mkdir()
    res, found = c.run(work, folder)
    return {"name": c.name, "when": c.when, "command": work.show(res.command),
            "exit": "timed out" if res.exit is None else res.exit, "seconds": res.seconds,
            "after_signal_s": res.stop_s, "said": work.show(_said(res))[:240], "found": work.show(found),
            "traceback": "Traceback" in res.stdout + res.stderr, "leftover_processes": res.leftover}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run only these cases (--list names them)")
    p.add_argument("--json", type=Path, default=RESULTS / "edges.json", help="result file (docs/results/edges.json)")
    p.add_argument("--list", action="store_true", help="print the cases' names and exit")
    args = p.parse_args()
    if args.list:
        print("\n".join(f"{c.name}: {c.when}" for c in CASES.values()))
        return 0
    unknown = sorted(set(args.only or ()) - set(CASES))
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; --list names them")
    chosen = [c for c in CASES.values() if not args.only or c.name in args.only]
    previous = json.loads(args.json.read_text()) if args.json.is_file() else {}
    rows = {r["name"]: r for r in previous.get("rows", [])}
    root = Path(tempfile.mkdtemp(prefix="apf-edges-"))
    try:
        work = Work(root)
        with LoadSampler() as load:
            for c in chosen:
                rows[c.name] = row = run_case(work, c)
                print(f"{c.name}: exit {row['exit']} in {row['seconds']} s — {row['said'][:110]}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ordered = [rows[name] for name in CASES if name in rows]
    this = {"command": command(), "date": now(), "code": code(), "cases": [c.name for c in chosen]}
    invocations = [*previous.get("invocations", []), this] if args.only else [this]  # a full run starts afresh
    result = {"date": now(), "command": invocations[0]["command"], "code": code(), "machine": machine(),
              "load_average": load.report(), "tiny_config": TINY, "invocations": invocations, "rows": ordered}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(edge_table(ordered))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
