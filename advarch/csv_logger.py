"""Lightning's CSV logger, made safe for a run folder written by several processes in turn.

Lightning's writer deletes an existing `metrics.csv` whenever a new writer starts in the same
version folder. Under `ddp_spawn` every stage (fit, validate, test) starts new worker
processes, so the test stage's writer erased the training curve. This writer continues the
file instead: it takes the existing header as its known columns and appends.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _ContinuingWriter(ExperimentWriter):
    """An experiment writer that appends to the version folder's `metrics.csv`."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose writer continues an existing file."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
