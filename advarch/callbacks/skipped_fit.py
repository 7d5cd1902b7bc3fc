"""Lightning's "`Trainer.fit` stopped: `max_epochs=50` reached." left out where advarch says it.

A run resumed from a checkpoint with nothing left to train skips Lightning's fit loop, and
Lightning says why before any batch, next to advarch's own "nothing left to train" line
(train.py's for `trainer.max_steps`, a continual strategy's for a finished task stream). A fit
that trains keeps Lightning's line at its end, where it is the word on why training stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from advarch.strategies.continual import ContinualStrategy

RANK_ZERO = logging.getLogger("lightning.pytorch.utilities.rank_zero")


class QuietSkippedFit(L.Callback, logging.Filter):
    """From `fit`'s start until training starts, drop Lightning's `max_steps` / `max_epochs`
    line where advarch explains it: the steps were reached, or the stream had finished."""

    def __init__(self) -> None:
        logging.Filter.__init__(self)
        self.trainer: L.Trainer | None = None
        self.stream_finished = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainer = trainer  # (its step is restored after this hook, before the line)
        self.stream_finished = isinstance(pl_module, ContinualStrategy) and (
            pl_module.finished_tasks == pl_module.num_tasks
        )
        RANK_ZERO.addFilter(self)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        RANK_ZERO.removeFilter(self)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        RANK_ZERO.removeFilter(self)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: Any
    ) -> None:
        RANK_ZERO.removeFilter(self)  # (no teardown hook follows an exception)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("`Trainer.fit` stopped: `max_"):
            return True
        steps_reached = 0 < self.trainer.max_steps <= self.trainer.global_step
        return not (steps_reached or self.stream_finished)
