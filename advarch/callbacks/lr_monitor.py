"""Lightning's LearningRateMonitor, once per optimizer step.

Lightning's logs at every batch whose step is due, and under gradient accumulation the
micro-batches of one step share it: `metrics.csv` held a copy of the learning-rate rows per
micro-batch (the same step and values), and W&B as many points.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor


class StepLearningRateMonitor(LearningRateMonitor):
    """`LearningRateMonitor` (same arguments) logging each optimizer step's rates once."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._logged_step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        if step != self._logged_step:
            self._logged_step = step
            super().on_train_batch_start(trainer, *args, **kwargs)
