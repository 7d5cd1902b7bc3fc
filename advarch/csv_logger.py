"""Lightning's CSV logger, made safe for a run folder written by several processes in turn.

Lightning's writer deletes an existing `metrics.csv` whenever a new writer starts in the same
version folder. Under `ddp_spawn` every stage (fit, validate, test) starts new worker
processes, so the test stage's writer erased the training curve. This writer continues the
file instead: it takes the existing header as its known columns and appends.

A resumed run starts its file with the rows its checkpoint's run logged before the checkpoint
(`carry_rows`), so that its curves start at step 0, as the uninterrupted run's do.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from advarch.atomic import write_atomic


class _ContinuingWriter(ExperimentWriter):
    """An experiment writer that appends to the version folder's `metrics.csv`."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose writer continues an existing file."""

    _carried = 0  # rows at the file's start carried from the run a resume continues

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

    def carry_rows(self, source: Path, before_step: int) -> None:
        """Start this run's `metrics.csv` with the rows of `source` (the metrics of the run a
        checkpoint of step `before_step` resumes) logged before that step; those from later,
        which the resumed run logs again, are left out. Nothing when `source` is missing."""
        if not source.is_file():
            return
        header, rows = _read(source)
        rows = [r for r in rows if r.get("step") and int(float(r["step"])) < before_step]
        self._write(header, rows)
        self.experiment.metrics_keys = header  # (a writer made before: it appends to these)
        self._carried = len(rows)

    def finalize(self, status: str) -> None:
        """Save, then drop the carried rows the resumed run logged again: a checkpoint of an
        epoch's last step is restored before that epoch's end, whose rows it logs anew."""
        super().finalize(status)
        carried, path = self._carried, Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if not carried or not path.is_file():
            return
        header, rows = _read(path)
        again = {_logged(row) for row in rows[carried:]}
        kept = [row for row in rows[:carried] if _logged(row) not in again] + rows[carried:]
        if len(kept) < len(rows):
            self._write(header, kept)
        self._carried = 0

    def _write(self, header: list[str], rows: list[dict[str, str]]) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=header)
                writer.writeheader()
                writer.writerows(rows)

        write_atomic(Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE, write)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A metrics file's header and rows."""
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _logged(row: dict[str, str]) -> tuple[str, frozenset[str]]:
    """What a row logged: its step and the metrics it holds."""
    return row.get("step", ""), frozenset(k for k, v in row.items() if v != "" and k != "step")
