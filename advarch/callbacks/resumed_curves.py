"""A resumed run's CSV curves start at step 0, as the uninterrupted run's do.

A resume writes into a folder of its own; its `metrics.csv` began at the checkpoint's step, so
`report.py` on it drew half curves (W&B continues the same run and has them all). At the start
of fit, each CSV logger starts its file with the rows the checkpoint's run logged before the
checkpoint's step (`CSVLogger.carry_rows`); a run requeued into its own folder, or logging
outside it (`logger.csv.save_dir`), drops from its file the rows logged after its checkpoint,
which it logs again. Every checkpoint flushes the CSV rows logged so far first: a kill -9
right after one (before the logger's periodic flush) lost the rows of its step's validation,
which the resume, starting after that step, never logged again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from advarch.checkpoint import run_dir_of
from advarch.csv_logger import CSVLogger


class ResumedCurves(L.Callback):
    """Carries the CSV rows of the run that wrote `checkpoint` (None: a fresh run, nothing)."""

    def __init__(self, checkpoint: Path | None, output_dir: Path) -> None:
        self.checkpoint, self.output_dir = checkpoint, output_dir

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.checkpoint is None or not trainer.is_global_zero:
            return
        saved = torch.load(self.checkpoint, map_location="cpu", mmap=True, weights_only=False)
        step = int(saved["global_step"])  # (restored only later: a finished one never trains)
        earlier_run = run_dir_of(self.checkpoint.resolve())
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.carry_rows(self._source(logger, earlier_run), step)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict) -> None:  # fmt: skip
        for logger in trainer.loggers:  # (before the checkpoint file is written)
            if isinstance(logger, CSVLogger):
                logger.save()

    def _source(self, logger: CSVLogger, earlier_run: Path) -> Path:
        """The earlier run's file of `logger`: at the same place in its folder, or, for a file
        outside the run folder (`logger.csv.save_dir`), the same file."""
        metrics = Path(logger.experiment.metrics_file_path).resolve()
        output_dir = self.output_dir.resolve()
        if not metrics.is_relative_to(output_dir):
            return metrics
        return earlier_run / metrics.relative_to(output_dir)
