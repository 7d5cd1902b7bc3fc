"""A resumed run's CSV curves start at step 0, as the uninterrupted run's do.

A resume writes into a folder of its own; its `metrics.csv` began at the checkpoint's step, so
`report.py` on it drew half curves (W&B continues the same run and has them all). At the start
of training, when the checkpoint's step is restored, each CSV logger starts its file with the
rows the checkpoint's run logged before that step (`CSVLogger.carry_rows`); a run requeued into
its own folder drops the rows logged after its checkpoint, which it logs again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L

from advarch.checkpoint import run_dir_of
from advarch.csv_logger import CSVLogger


class ResumedCurves(L.Callback):
    """Carries the CSV rows of the run that wrote `checkpoint` (None: a fresh run, nothing)."""

    def __init__(self, checkpoint: Path | None, output_dir: Path) -> None:
        self.checkpoint, self.output_dir = checkpoint, output_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.checkpoint is None or not trainer.is_global_zero:
            return
        earlier_run = run_dir_of(self.checkpoint.resolve())
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                metrics = Path(logger.experiment.metrics_file_path)
                source = earlier_run / metrics.resolve().relative_to(self.output_dir.resolve())
                logger.carry_rows(source, trainer.global_step)
