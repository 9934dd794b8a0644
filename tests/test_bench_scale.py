"""``bench/scale.py`` (issue 16): the combinations ``--only`` takes, and the goals it checks against what
it measured -- each goal can fail."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import load_script

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scale():
    return load_script(REPO / "bench" / "scale.py")


def _row(model: str, n: int, k: int, *, uplink: str = "apf", server_mb: float = 1000.0, copies: float = 50.0,
         driver_mb: float = 900.0, actor_mb: float = 1200.0) -> dict:
    return {"model": model, "num_clients": n, "clients_per_round": k, "uplink": uplink, "server_work_copies": copies,
            "memory": {"driver_peak_rss_mb": driver_mb, "server_actor_peak_rss_mb": [server_mb],
                       "client_actor_peak_rss_mb": [actor_mb, actor_mb / 2]}}


def test_only_takes_the_issues_check_command_and_a_stateful_row_and_refuses_the_rest(scale):
    parser = argparse.ArgumentParser()
    assert scale.parse_only(["resnet18:1000:10", "resnet18:1000:1000", "resnet18:10000:100:topk"], parser) == {
        ("resnet18", 1000, 10, "apf"), ("resnet18", 1000, 1000, "apf"), ("resnet18", 10000, 100, "topk")}
    for bad in ("resnet18:1000", "vgg:100:10", "lenet5:100:1000", "lenet5:100:10:gzip", "lenet5:x:10"):
        with pytest.raises(SystemExit):
            scale.parse_only([bad], parser)


def test_the_script_refuses_a_bad_combination_in_one_line_before_starting_ray():
    proc = subprocess.run([sys.executable, "bench/scale.py", "--only", "lenet5:100:1000"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--only lenet5:100:1000: expected MODEL:N:K" in proc.stderr and "Traceback" not in proc.stderr


def test_each_goal_is_met_by_a_row_within_it_and_not_by_one_past_it(scale):
    within = [_row("resnet18", 1000, 10, server_mb=1800, copies=59), _row("resnet18", 1000, 1000, server_mb=2700),
              _row("resnet18", 10000, 100, uplink="topk", actor_mb=3000)]
    assert [(g["row"], g["met"]) for g in scale.goals(within)] == [
        ("resnet18:1000:10", True), ("resnet18:1000:1000", True), ("resnet18:10000:100:topk", True)]

    past = [_row("resnet18", 1000, 10, server_mb=1800, copies=61), _row("resnet18", 1000, 1000, server_mb=2701),
            _row("resnet18", 10000, 100, uplink="topk", driver_mb=3900)]
    checked = scale.goals(past)
    assert [g["met"] for g in checked] == [False, False, False]
    assert [g["measured"] for g in checked] == [61, 1.501, 3900]


def test_a_goal_whose_rows_did_not_run_is_not_reported(scale):
    skipped = {"model": "resnet18", "num_clients": 1000, "clients_per_round": 1000, "uplink": "apf",
               "skipped": "needs more memory"}
    assert [g["row"] for g in scale.goals([_row("lenet5", 1000, 10), skipped])] == []


def _worktrees() -> str:
    return subprocess.run(["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow  # two Ray clusters, one per version
def test_side_by_side_runs_each_row_with_both_versions_and_leaves_no_worktree(tmp_path):
    """A real comparison of this tree with itself (HEAD): both tables get the row, measured by each version's own
    process, with the load of the one run; the temporary worktree is gone afterwards, and a rerun reuses
    the rows it kept."""
    worktrees = _worktrees()
    before, after, work = tmp_path / "before.json", tmp_path / "after.json", tmp_path / "work"
    cmd = [sys.executable, "bench/scale_versus.py", "--before", "HEAD", "--rounds", "2", "--only", "lenet5:100:10",
           "--work", str(work), "--json-before", str(before), "--json", str(after)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _worktrees() == worktrees
    tables = {side: json.loads(path.read_text()) for side, path in (("before", before), ("after", after))}
    for side, table in tables.items():
        (row,) = table["rows"]
        assert (row["model"], row["num_clients"], row["clients_per_round"], row["rounds"]) == ("lenet5", 100, 10, 2)
        assert row["median_wall_s"] > 0 and len(row["wall_s_per_round"]) == 2, side
        assert table["versus"]["before"].startswith("commit ") and "mean_1min_during" in table["load_average"]
    assert tables["before"]["load_average"] == tables["after"]["load_average"]
    assert "median round, after / before:" in proc.stdout

    kept = {p.relative_to(work): p.stat().st_mtime_ns for p in work.rglob("*.json")}
    assert len(kept) == 2
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p.relative_to(work): p.stat().st_mtime_ns for p in work.rglob("*.json")} == kept  # nothing measured again


def test_side_by_side_refuses_an_unknown_revision_in_one_line():
    proc = subprocess.run([sys.executable, "bench/scale_versus.py", "--before", "no-such-rev"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--before no-such-rev: not a commit of" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # starts a Ray cluster in the row it stops
def test_side_by_side_stops_on_sigterm_with_its_row_even_started_with_sigint_ignored(tmp_path):
    """Started as a shell's background job (SIGINT ignored, which its rows would inherit), a SIGTERM during
    a row stops that row's process too, leaves no worktree, and says how to continue."""
    worktrees = _worktrees()
    proc = subprocess.Popen(
        [sys.executable, "bench/scale_versus.py", "--before", "HEAD", "--rounds", "2", "--only", "lenet5:100:10",
         "--work", str(tmp_path / "work"), "--json-before", str(tmp_path / "b.json"),
         "--json", str(tmp_path / "a.json")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    line = ""
    while not line.endswith(" ...\n"):  # "  before ..." or "  after ...": a row's process is starting
        line = proc.stdout.readline()
        assert line, "the comparison ended before starting a row"
    time.sleep(2)
    rows = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("stopped; rerun the same command to continue")
    assert rows and not any(Path(f"/proc/{pid}").exists() for pid in rows)
    assert _worktrees() == worktrees
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
