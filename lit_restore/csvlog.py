"""One CSV history per run dir: `logs/version_0/metrics.csv` carries on across restarts.

Lightning's CSV writer deletes an existing metrics file when it starts, so a resumed run would
lose (or, with a new version folder per start, split) its history. This writer keeps the rows
logged before the step the run resumes from and drops the later ones, which the resumed run
logs again.
"""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _HistoryWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        path = os.path.join(log_dir, _ExperimentWriter.NAME_METRICS_FILE)
        history: list[dict[str, Any]] = []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                history = list(csv.DictReader(f))
        super().__init__(log_dir)
        self._trim = bool(history)
        if history:
            self._write(history)

    def _check_log_dir_exists(self) -> None:
        """Lightning warns here and deletes the metrics file; this writer keeps it (see above)."""

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self.metrics_keys = sorted(set().union(*rows))
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)

    def save(self) -> None:
        if self._trim and self.metrics:
            resumed_at = min(int(m["step"]) for m in self.metrics)
            with open(self.metrics_file_path, newline="") as f:
                self._write([row for row in csv.DictReader(f) if _step(row) < resumed_at])
            self._trim = False
        super().save()


def _step(row: dict[str, Any]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `<save_dir>/logs/version_0/metrics.csv` across restarts (see the module docstring)."""

    def __init__(self, save_dir: str | os.PathLike) -> None:
        super().__init__(save_dir=save_dir, name="logs", version=0)

    @property
    @rank_zero_experiment
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment
