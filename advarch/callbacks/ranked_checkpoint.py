"""Lightning's ModelCheckpoint, with every best-k checkpoint ranked by a validation of its own
weights.

Lightning's step-triggered save (`every_n_train_steps`) runs in `on_train_batch_end`, before
that step's validation: mid-epoch it ranks the new weights by the previous validation's score
(`best-200.ckpt` scored by step 100's weights), and a run that ends off the validation
cadence (`max_steps`, `max_epochs`, `max_time`, early stopping) never ranks its final weights.
Here a step-triggered save, or the stop's, ranks the weights at the end of the next
validation, which Lightning runs when a stop is asked for (`ValidateAtLastStep` asks at the
run's last step), and writes `last.ckpt` (the resume point) after the validation of its step,
or at once where none follows: a run killed in that validation resumes from the checkpoint
before and runs it again, where one resumed from a checkpoint written before it skipped it
(Lightning counts a step's validation done with the step: its row, its ranking and early
stopping's count were lost). Lightning orders checkpoint callbacks last, so the others have
asked by then.

Its state (the best-k record) is keyed by the metric and direction it ranks, not by the
cadence: a resume that checkpoints more or less often keeps the record.
"""

from __future__ import annotations

import ast
import logging
import re
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

log = logging.getLogger("advarch")


class RankedCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (same arguments) whose top-k are ranked by fresh validation scores."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rank_at_validation = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:  # fmt: skip
        """Find this record in a checkpoint that keyed it with its cadence (saved before the
        key left it out); say so where the checkpoint ranked another metric or direction."""
        states = checkpoint.get("callbacks") or {}
        name = type(self).__qualname__
        saved = {k: _options(k[len(name) :]) for k in states
                 if isinstance(k, str) and k.startswith(name + "{")}  # fmt: skip
        if self.state_key in states or not saved:
            return
        wanted = (self.monitor, self.mode)
        same = [k for k, v in saved.items() if (v.get("monitor"), v.get("mode")) == wanted]
        if same:
            states[self.state_key] = states[same[0]]
            return
        before = next(iter(saved.values()))
        if before.get("monitor") is not None and self.monitor is not None:
            log.warning(
                "the checkpoint ranked its best by %s (%s); this run ranks by %s (%s): its "
                "best checkpoints start afresh",
                before["monitor"], before.get("mode"), self.monitor, self.mode,
            )  # fmt: skip

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:  # fmt: skip
        every = self._every_n_train_steps
        due = every >= 1 and trainer.global_step % every == 0
        final = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        skip = self._should_skip_saving_checkpoint(trainer)
        if self.monitor is None or not (due or final) or skip:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        loop = trainer.fit_loop
        if not loop.epoch_loop._should_check_val_fx(loop._data_fetcher):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        # else the validation this step runs saves it: a resume of a checkpoint written
        # before it would skip it (Lightning counts a step's validation done with the step)
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


def _options(text: str) -> dict[str, Any]:
    """The options a state key names (`{'monitor': 'val/loss', …}`); those that are not plain
    values (a `train_time_interval`'s timedelta) read as absent."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return dict(re.findall(r"'(monitor|mode)': '([^']*)'", text))
