"""Validate the final weights inside `fit`, also when `trainer.max_steps` ends it mid-epoch.

Lightning validates every `val_check_interval` batches, so a run whose `max_steps` (or whose
last epoch's length) is not a multiple of the interval stops with its last validation some
steps before the end. A validation after `fit` would score the final weights, but outside
`fit` no checkpoint callback sees it: `best-*.ckpt` would miss the final weights even when
they score best, and the progress bar would show other numbers than the summary. Asking the
loop to stop at the last step makes Lightning validate there, inside `fit`, as it does for
early stopping. `trained` says whether this `fit` trained at all (a resumed checkpoint may be
finished already).
"""

from __future__ import annotations

from typing import Any

import lightning as L


class ValidateAtLastStep(L.Callback):
    """Set `trainer.should_stop` once the optimizer steps reach `trainer.max_steps`, or at the
    last batch of the last epoch (`trainer.max_epochs`)."""

    def __init__(self) -> None:
        self.trained = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        self.trained = True
        last_epoch = 0 < (trainer.max_epochs or 0) <= trainer.current_epoch + 1
        if 0 < trainer.max_steps <= trainer.global_step or (last_epoch and trainer.is_last_batch):
            trainer.should_stop = True
