"""Lightning's ModelCheckpoint, with every best-k checkpoint ranked by a validation of its own
weights.

Lightning's step-triggered save (`every_n_train_steps`) runs in `on_train_batch_end`, before
that step's validation: mid-epoch it ranks the new weights by the previous validation's score
(`best-200.ckpt` scored by step 100's weights), and a run that ends off the validation
cadence (`max_steps`, `max_epochs`, `max_time`, early stopping) never ranks its final weights.
Here a step-triggered save, or the stop's, writes `last.ckpt` (the resume point) at once and
ranks the weights at the end of the next validation, which Lightning runs when a stop is asked
for (`ValidateAtLastStep` asks at the run's last step). Lightning orders checkpoint callbacks
last, so the others have asked by then.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn


class RankedCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (same arguments) whose top-k are ranked by fresh validation scores."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rank_at_validation = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        final = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        skip = self._should_skip_saving_checkpoint(trainer)
        if self.monitor is None or not (due or final) or skip:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._rank_at_validation = True

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        ranks = self._rank_at_validation or trainer.should_stop and not trainer.fast_dev_run
        if not (ranks and fitting):
            super().on_validation_end(trainer, pl_module)
            return
        self._rank_at_validation = False
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)  # the resume point knows the new best
