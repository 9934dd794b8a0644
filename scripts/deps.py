#!/usr/bin/env python3
"""The dependency lock, and the brand-new virtualenvs that test it.

``pyproject.toml`` keeps version *ranges* (people import the library next to their own
packages); ``constraints.txt`` pins the version of every package a fresh install of
``apf-ray[test]`` holds, transitive ones included — the versions the tests passed with. Both
README commands install with ``-c constraints.txt``, and so does CI (``.ci/run``), so what we
test is what a newcomer gets. Drift is looked for on purpose, not met by users:

    python3 scripts/deps.py lock     # re-resolve the newest allowed versions in a new venv, write constraints.txt
    python3 scripts/deps.py fresh    # a newcomer: new venv, empty pip cache, the README's install, the fast lane
    python3 scripts/deps.py newest   # new venv, the newest versions pyproject allows, their diff from the lock,
                                     # the fast lane
    python3 scripts/deps.py readme-command 2   # the README Quickstart's command 2, as .ci/run runs it

``fresh`` writes ``docs/results/fresh_install.json`` and ``newest`` writes
``docs/results/newest_versions.json`` (versions, differences, pass/fail counts, date, machine);
both exit 1 when the fast lane fails. Every venv lives in a temporary folder, removed at the end.
Run from any directory; the machine's pip configuration (indexes, find-links) applies.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout with the system python3: apf_ray need not be installed
    sys.path.insert(0, str(REPO))

from apf_ray.provenance import LoadSampler, machine, now  # noqa: E402 (light: imports nothing of torch or Ray)

LOCK = REPO / "constraints.txt"
README = REPO / "README.md"
RESULTS = REPO / "docs" / "results"
PROJECT = "apf-ray"
FAST_LANE = ["-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider"]
LOCK_HEADER = """\
# The tested version of every package `pip install -e '.[test]'` installs (transitive ones too).
# Both README commands install with `-c constraints.txt`; pyproject.toml keeps the ranges.
# Regenerate in a brand-new virtualenv: python3 scripts/deps.py lock
# Resolved with Python {python} on {platform}. Local version labels (torch's +cpu) are left
# out: `torch==X` admits every build of X, and the index pip is given decides which (README, Quickstart).
"""


def readme_command(number: int) -> str:
    """Command ``number`` of the README's Quickstart: the line after the ``# <number>. ...`` comment."""
    text = README.read_text()
    quickstart = text[text.index("## Quickstart"):]
    block = re.search(r"```bash\n(.*?)```", quickstart, flags=re.S)
    if block is None:
        raise ValueError("README.md: the Quickstart section has no ```bash block")
    lines = block.group(1).splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith(f"# {number}. "):
            return lines[i + 1]
    raise ValueError(f"README.md: the Quickstart's ```bash block has no command '# {number}. ...'")


def canonical(name: str) -> str:
    """PEP 503 normalised project name (``Foo_Bar`` and ``foo-bar`` are one package)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonical(name)] = version
    return pins


class Venv:
    """A brand-new virtualenv in a temporary folder, made by this machine's ``python3 -m venv``."""

    def __init__(self, root: Path) -> None:
        self.root = root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.root)], check=True)
        self.python = str(self.root / "bin" / "python")
        # As after `. venv/bin/activate`: `python3`, `pip` and `apf-ray` are the venv's.
        self.env = {**os.environ, "VIRTUAL_ENV": str(self.root),
                    "PATH": f"{self.root / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        self.env.pop("PYTHONHOME", None)

    def shell(self, command: str, **env: str) -> float:
        """Run ``command`` in bash from the repository root inside the venv; its wall time, seconds."""
        start = time.monotonic()
        subprocess.run(["bash", "-c", command], cwd=REPO, env={**self.env, **env}, check=True)
        return time.monotonic() - start

    def packages(self) -> dict[str, str]:
        """``{canonical name: version}`` of every package installed but the project and pip.

        setuptools is included (``--all``): torch requires it at run time.
        """
        out = subprocess.run([self.python, "-m", "pip", "freeze", "--all", "--exclude", PROJECT, "--exclude", "pip"],
                             capture_output=True, text=True, check=True, env=self.env).stdout
        found = {}
        for line in out.splitlines():
            if "==" in line and not line.startswith("#"):
                name, version = line.split("==")
                found[canonical(name)] = version.split("+", 1)[0]  # 2.13.0+cpu -> 2.13.0
        return found

    def size_mib(self) -> float:
        """The venv's size on disk, MiB."""
        return round(sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file() and not f.is_symlink())
                     / 2**20, 1)

    def fast_lane(self) -> dict[str, Any]:
        """``python3 -m pytest -m "not slow"`` in the venv: command, wall time (s), counts, failed test ids."""
        start = time.monotonic()
        with LoadSampler() as load:
            proc = subprocess.run([self.python, *FAST_LANE], cwd=REPO, env=self.env, capture_output=True, text=True)
        wall = time.monotonic() - start
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
        lines = proc.stdout.strip().splitlines()
        tail = lines[-1] if lines else ""
        counts = {kind: int(n) for n, kind in
                  re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", tail)}
        failed = [line.split(" ", 1)[1].split(" - ", 1)[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
        return {"command": 'python3 -m pytest -m "not slow"', "exit_code": proc.returncode, "wall_s": round(wall, 1),
                "counts": counts, "failed": failed, "last_line": tail, "load_average": load.report()}


def newest_install(venv: Venv) -> float:
    """Install the project with the newest versions pyproject allows (no lock); wall time, seconds."""
    return venv.shell("python3 -m pip install --upgrade -e '.[test]'")


def lock(_: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="apf-ray-lock-") as tmp:
        venv = Venv(Path(tmp))
        newest_install(venv)
        pins = venv.packages()
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))
    where = f"{platform.system()} {platform.machine()}"
    LOCK.write_text(LOCK_HEADER.format(python=platform.python_version(), platform=where) + body)
    print(f"wrote {LOCK.relative_to(REPO)}: {len(pins)} packages")


def write_result(name: str, data: dict[str, Any]) -> None:
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path.relative_to(REPO)}")


def fresh(_: argparse.Namespace) -> None:
    install = readme_command(2).split(" && ", 1)[0]
    with tempfile.TemporaryDirectory(prefix="apf-ray-fresh-") as tmp:
        venv = Venv(Path(tmp))
        with LoadSampler() as load:  # an empty pip cache: every wheel fetched or built, as on a first install
            install_s = venv.shell(install, PIP_CACHE_DIR=str(Path(tmp) / "pip-cache"))
        got, pinned = venv.packages(), read_lock()
        unpinned = sorted(set(got) - set(pinned))
        off = {n: {"lock": pinned[n], "installed": v} for n, v in got.items() if n in pinned and pinned[n] != v}
        tests = venv.fast_lane()
        size = venv.size_mib()
    write_result("fresh_install", {
        "install": {"command": install, "wall_s": round(install_s, 1), "packages": len(got), "venv_mib": size,
                    "pip_cache": "empty (every wheel fetched from the configured indexes, as on a first install)",
                    "load_average": load.report()},
        "unpinned": unpinned, "differing_from_lock": off, "fast_lane": tests, "date": now(), "machine": machine()})
    if unpinned or off or tests["exit_code"]:
        sys.exit(f"error: the locked install is not what was tested (unpinned {unpinned}, differing {off}) "
                 f"or its fast lane failed (exit {tests['exit_code']})")


def newest(_: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="apf-ray-newest-") as tmp:
        venv = Venv(Path(tmp))
        install_s = newest_install(venv)
        got, pinned = venv.packages(), read_lock()
        tests = venv.fast_lane()
    changed = {n: {"lock": pinned[n], "newest": got[n]} for n in sorted(set(got) & set(pinned)) if got[n] != pinned[n]}
    write_result("newest_versions", {
        "install": {"command": "python3 -m pip install --upgrade -e '.[test]'", "wall_s": round(install_s, 1)},
        "versions": got, "changed_from_lock": changed,
        "only_newest": {n: got[n] for n in sorted(set(got) - set(pinned))},
        "only_lock": {n: pinned[n] for n in sorted(set(pinned) - set(got))},
        "fast_lane": tests, "date": now(), "machine": machine()})
    print(f"{len(changed)} packages newer than the lock: "
          + ", ".join(f"{n} {d['lock']} -> {d['newest']}" for n, d in changed.items()))
    if tests["exit_code"]:
        failed = tests["failed"] or tests["last_line"]
        sys.exit(f"error: the fast lane fails with the newest allowed versions: {failed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, dest="command")
    commands.add_parser("lock", help="write constraints.txt from the newest allowed versions").set_defaults(run=lock)
    commands.add_parser("fresh", help="a newcomer's install with the lock, then the fast lane").set_defaults(run=fresh)
    commands.add_parser("newest", help="the newest allowed versions, then the fast lane").set_defaults(run=newest)
    show = commands.add_parser("readme-command", help="print the README Quickstart's command N")
    show.add_argument("number", type=int)
    show.set_defaults(run=lambda args: print(readme_command(args.number)))
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
