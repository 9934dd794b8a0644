"""What a newcomer installs is what we test: the lock, the README's commands, CI, the fast lane."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from tests.conftest import slow_tests
from tests.helpers import load_script

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
deps = load_script(REPO / "scripts" / "deps.py")


def _quickstart_block() -> str:
    text = README.read_text()
    quickstart = text[text.index("## Quickstart"):text.index("\n## ", text.index("## Quickstart") + 1)]
    return re.search(r"```bash\n(.*?)```", quickstart, flags=re.S).group(1)


def test_the_quickstart_makes_a_virtualenv_and_both_commands_install_with_the_lock():
    block = _quickstart_block()
    assert block.splitlines()[0] == "python3 -m venv .venv && . .venv/bin/activate"
    first, second = deps.readme_command(1), deps.readme_command(2)
    assert first.startswith("python3 -m pip install -c constraints.txt -e . && apf-ray train ")
    assert second == "python3 -m pip install -c constraints.txt -e '.[test]' && python3 -m pytest -q -n 2"
    assert (REPO / "constraints.txt").is_file()


def test_ci_runs_the_readmes_second_command_verbatim():
    printed = subprocess.run([str(REPO / ".ci" / "run"), "--print-command"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    assert printed.splitlines() == [deps.readme_command(2)]
    assert printed.splitlines()[0] in _quickstart_block().splitlines()
    script = (REPO / ".ci" / "run").read_text()
    assert 'python3 -m venv "$venv"' in script and 'eval "$command"' in script


def _required(name: str, extras: frozenset[str]) -> list[Requirement]:
    """The requirements of installed distribution ``name`` that apply here with ``extras`` requested."""
    found = []
    for line in metadata.requires(name) or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras or {""}):
            found.append(req)
    return found


def test_the_lock_pins_every_package_the_installed_distribution_requires_within_its_ranges():
    pins = deps.read_lock()
    seen: set[str] = set()
    todo = [("apf-ray", frozenset({"test"}))]
    while todo:
        name, extras = todo.pop()
        for req in _required(name, extras):
            key = deps.canonical(req.name)
            assert key in pins, f"constraints.txt does not pin {req.name} (required by {name}: {req})"
            assert req.specifier.contains(pins[key], prereleases=True), (
                f"constraints.txt pins {key}=={pins[key]}, outside {name}'s requirement {req}")
            if (key, frozenset(req.extras)) not in seen:
                seen.add((key, frozenset(req.extras)))
                todo.append((req.name, frozenset(req.extras)))
    assert {"torch", "ray", "optuna", "numpy", "pytest", "ruff"} <= {key for key, _ in seen}


def test_the_lock_is_name_equals_version_lines_without_a_build_label():
    lines = [line for line in (REPO / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[a-z0-9-]+==[0-9][0-9A-Za-z.]*", line) for line in lines), lines
    assert any(line.startswith("torch==") for line in lines)  # ==X admits X+cpu and X's CUDA build alike
    assert "apf-ray" not in deps.read_lock()


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m) for m in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}


def test_every_link_of_the_readme_and_the_docs_to_a_repository_file_or_heading_exists():
    checked = 0
    for doc in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.relative_to(REPO)} links to {target}, which the repository lacks"
            if anchor:
                assert anchor in _anchors(file), f"{doc.relative_to(REPO)} links to {target}: no such heading"
            checked += 1
    assert checked > 20
    assert "SPEC.md" not in README.read_text()


def test_the_fast_lane_keeps_every_test_module_and_every_listed_slow_test_exists():
    def collect(*args: str) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # the outer run's -v or junit file
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return [line for line in proc.stdout.splitlines() if "::" in line]

    everything = collect()
    fast = collect("-m", "not slow")
    modules = {node.split("::")[0] for node in everything}
    assert {node.split("::")[0] for node in fast} == modules
    assert set(slow_tests()) <= set(everything), sorted(set(slow_tests()) - set(everything))
    assert len(fast) < len(everything)
