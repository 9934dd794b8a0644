"""``bench/edges.py``: each edge case is a real ``apf-ray`` command, recorded as it happened.

Only cheap cases run here (a config refused before anything starts); the whole script is a
benchmark (``python3 bench/edges.py``), its table rendered into the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import load_script

REPO = Path(__file__).resolve().parent.parent


def _edges():
    return load_script(REPO / "bench" / "edges.py")


def test_the_edge_script_records_each_command_its_exit_its_line_and_what_it_left(tmp_path):
    result = tmp_path / "edges.json"
    proc = subprocess.run([sys.executable, "bench/edges.py", "--only", "train-config-to-tune", "unknown-config-key",
                           "--json", str(result)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(result.read_text())
    rows = {r["name"]: r for r in data["rows"]}
    assert list(rows) == ["unknown-config-key", "train-config-to-tune"]  # the script's order, not the command's
    tune = rows["train-config-to-tune"]
    assert tune["command"] == "apf-ray tune --config configs/digits-lenet5.yaml --output $TMP/train-config-to-tune/run"
    assert tune["exit"] == 2 and tune["said"].startswith("error: ") and "configs/digits-lenet5.yaml" in tune["said"]
    assert tune["found"] == "nothing written" and not tune["traceback"] and tune["leftover_processes"] == 0
    typo = rows["unknown-config-key"]
    assert typo["exit"] == 2 and "rouns" in typo["said"] and "/tmp" not in typo["said"] + typo["command"]
    assert data["machine"] and data["command"].startswith("python3 bench/edges.py --only")
    for row in rows.values():  # the table the README renders, one line per case
        assert f"| {row['when']} | `{row['command']}` | 2 |" in proc.stdout


def test_a_command_past_its_timeout_is_killed_and_reads_timed_out(tmp_path):
    edges = _edges()
    work = edges.Work(tmp_path)
    res = edges.apf_ray(work, ["train", "--inprocess", "--config", str(work.tiny), "--output", str(tmp_path / "run")],
                        timeout_s=3)
    assert res.exit is None and res.leftover == 0
    assert _running_with(str(tmp_path / "run")) == []


def _running_with(text: str) -> list[int]:
    """Live processes whose command line holds ``text``."""
    found = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in path.read_bytes():
                found.append(int(path.parent.name))
        except OSError:  # it ended meanwhile
            continue
    return found
