"""What a user sees: the progress line and the tables fit 80 columns, the plots are labelled."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from apf_ray.callbacks import RunView
from apf_ray.metrics import history_figure, read_history
from apf_ray.progress import ProgressDisplay
from apf_ray.records import RoundEvent, RoundRecord
from apf_ray.report import comparison_rows, comparison_table, summary_table
from apf_ray.run import run
from tests.helpers import png_contents, tiny_config

VARIANTS = ["fedavg", "apf", "partial_sync:threshold=0.2", "permanent:threshold=0.2", "apf+int8",
            "fedavg+topk:ratio=0.1", "fedavg+gaia", "cmfl:threshold=0.5"]


def _record(round_: int, *, accuracy: float | None = 0.9611, up: int = 172_180_000, frozen: float = 0.445,
            sampled: int = 10, reported: int = 10) -> RoundRecord:
    return RoundRecord(round=round_, test_accuracy=accuracy, test_loss=0.1, train_loss=0.1, bytes_up=1, bytes_down=1,
                       cum_bytes_up=up, cum_bytes_down=1, frozen_fraction=frozen, threshold=0.2,
                       clients_sampled=sampled, clients_reported=reported, clients_dropped=sampled - reported,
                       wall_s=1.0, simulated_s=1.0, cum_simulated_s=1234.5)


def _at_80_columns(renderable) -> list[str]:
    out = Console(width=80, record=True, force_terminal=True, file=open("/dev/null", "w"))  # noqa: SIM115
    out.print(renderable)
    return out.export_text().splitlines()


def _progress_lines(label: str, rounds: int, rec: RoundRecord) -> list[str]:
    display = ProgressDisplay(Console(width=80, file=open("/dev/null", "w")), label)  # noqa: SIM115
    display.on_start(RunView(tiny_config(rounds=rounds), None))
    try:
        display.on_round(RoundEvent(rec, []))
        return _at_80_columns(display.progress.get_renderable())
    finally:
        display.close()


def test_the_progress_line_of_the_default_workload_fits_80_columns_in_one_line():
    lines = _progress_lines("digits-lenet5", 100, _record(99))
    assert len(lines) == 1 and len(lines[0]) <= 80
    assert re.search(r"digits-lenet5 .* 99/100 0:00:\d\d acc 0\.961 · frozen 44% · up 172\.2 MB$", lines[0].rstrip())


@pytest.mark.parametrize("rounds, rec", [
    (300, _record(299, accuracy=1.0, up=1_234_567_890, frozen=1.0)),
    (1000, _record(999, sampled=100, reported=97)),
    (5, _record(1, accuracy=None, up=0, frozen=0.0)),
])
def test_the_progress_line_never_exceeds_80_columns_nor_cuts_a_number(rounds, rec):
    lines = _progress_lines("apf:aggressive_prob=0.3", rounds, rec)
    text = " ".join(lines)
    assert all(len(line) <= 80 for line in lines)
    assert f"{rec.round}/{rounds}" in text and text.count("…") == 1  # only the label is shortened
    assert f"up {rec.cum_bytes_up / 1e6:.1f} MB" in text
    if rec.clients_reported < rec.clients_sampled:
        assert f"{rec.clients_reported}/{rec.clients_sampled} reported" in text


def test_the_summary_table_fits_80_columns_and_folds_a_long_run_directory():
    summary = {"rounds": 100, "final_accuracy": 0.9611, "best_accuracy": 0.9611, "bytes_up": 172_180_000,
               "bytes_down": 190_000_000, "frozen_fraction_final": 0.445, "clients_dropped": 0,
               "simulated_time_s": 1234.5, "wall_time_s": 150.2,
               "run_dir": "/home/someone/experiments/apf/runs/digits-lenet5-20260101-120000/with/a/long/tail"}
    lines = _at_80_columns(summary_table(summary, "digits-lenet5 · apf"))
    assert all(len(line) <= 80 for line in lines)
    text = "".join(line.strip("│ ") for line in lines)
    assert summary["run_dir"] in text and "0.9611" in text and "172.18" in text and "…" not in text


def test_the_comparison_table_of_every_strategy_fits_80_columns_without_cutting_a_number():
    summary = {"final_accuracy": 0.9611, "best_accuracy": 0.9639, "bytes_up": 1_172_180_000,
               "bytes_down": 190_000_000, "simulated_time_s": 1234.5, "frozen_fraction_final": 0.445, "rounds": 100}
    lines = _at_80_columns(comparison_table(comparison_rows(dict.fromkeys(VARIANTS, summary)), "every strategy"))
    assert all(len(line) <= 80 for line in lines)
    rows = [line for line in lines if "0.9611" in line]
    assert len(rows) == len(VARIANTS) and "…" not in "".join(lines)
    assert all(line.rstrip().endswith("0.9611 0.9639 1,172.18 190.00   0.0%   0.0% 1234.5   0.0%  44.5%")
               for line in rows)


def test_the_curves_have_unit_labels_integer_round_ticks_and_a_title_naming_the_run(tmp_path):
    run_dir = tmp_path / "quickstart"
    run(tiny_config("output.plots=true", "output.tensorboard=false", rounds=3), run_dir)
    drawn = png_contents(run_dir / "curves.png")
    assert drawn["title"] == "quickstart: tiny, apf"
    assert [(p["title"], p["series"]) for p in drawn["panels"]] == [
        ("Accuracy", {"apf": 3}), ("Uplink traffic", {"apf": 3}), ("Frozen parameters", {"apf": 3})]
    fig = history_figure({"apf": read_history(run_dir)}, title="quickstart: tiny, apf")
    fig.canvas.draw()
    assert fig._suptitle.get_text() == "quickstart: tiny, apf"
    for ax in fig.axes:
        assert re.search(r"\(.+\)$", ax.get_ylabel()), ax.get_ylabel()  # a unit in parentheses
        assert ax.get_xlabel() == "round"
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks)
