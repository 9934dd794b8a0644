"""A run folder read back in Python: its summary, its tables and its plot.

:class:`Results` is how notebooks and scripts look at a run, finished or not: the tables come
from the run's journal (appended every round, see :mod:`apf_ray.metrics`), so a run still in
progress, or one that stopped, can be read too. It reads the same files the command line
writes, with the same functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas
    import pyarrow

    from apf_ray.config import ExperimentConfig
    from apf_ray.records import RoundRecord


class Results:
    """The outputs of the run in ``run_dir`` (a folder :func:`apf_ray.train` or ``apf-ray train`` wrote).

    Units as in the files: bytes, seconds, accuracy as a fraction, frozen fractions in [0, 1].
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        if not (self.run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{self.run_dir} is not an apf-ray run folder (it has no config.yaml)")

    def __repr__(self) -> str:
        return f"Results({str(self.run_dir)!r})"

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json``: final and best accuracy, bytes up/down, frozen fraction, times, config."""
        path = self.run_dir / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist yet: the run has not finished "
                                    f"(rounds() reads the rounds done so far)")
        return json.loads(path.read_text())

    @property
    def config(self) -> ExperimentConfig:
        """The resolved config the run used (``config.yaml``)."""
        from apf_ray.config import build_config, read_yaml_mapping

        return build_config(read_yaml_mapping(self.run_dir / "config.yaml"), source=str(self.run_dir / "config.yaml"))

    def rounds(self) -> pyarrow.Table:
        """One row per round (the columns of ``rounds.parquet``)."""
        return self._table("rounds")

    def clients(self) -> pyarrow.Table:
        """One row per sampled client per round (the columns of ``clients.parquet``)."""
        return self._table("clients")

    def layers(self) -> pyarrow.Table:
        """Frozen fraction per layer per round (``layers.parquet``)."""
        return self._table("layers")

    def rounds_frame(self) -> pandas.DataFrame:
        """:meth:`rounds` as a pandas DataFrame (needs pandas, which Ray Tune installs)."""
        return self.rounds().to_pandas()

    def clients_frame(self) -> pandas.DataFrame:
        """:meth:`clients` as a pandas DataFrame."""
        return self.clients().to_pandas()

    def history(self) -> list[RoundRecord]:
        """The round records themselves, as the callbacks saw them."""
        from apf_ray.metrics import read_history

        return read_history(self.run_dir)

    def plot(self, path: str | Path | None = None, title: str | None = None) -> Path:
        """Accuracy, cumulative uplink and frozen fraction per round as a PNG (default: ``curves.png``);
        what it draws is in its metadata (:func:`apf_ray.metrics.figure_contents`)."""
        from apf_ray.metrics import plot_history, run_title

        cfg = self.config
        path = Path(path) if path is not None else self.run_dir / "curves.png"
        return plot_history(path, {cfg.strategy.name: self.history()},
                            title=title or run_title(self.run_dir, cfg.name, cfg.strategy.name))

    def _table(self, name: str) -> pyarrow.Table:
        from apf_ray.metrics import journal_tables

        if (self.run_dir / "journal").is_dir():
            return journal_tables(self.run_dir)[name]
        import pyarrow.parquet as pq

        return pq.read_table(self.run_dir / f"{name}.parquet")
