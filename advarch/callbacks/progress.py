"""A Rich progress bar whose epoch label reads right in step-budgeted runs.

Lightning labels the bar `Epoch e/max_epochs-1`, which prints `Epoch 3/-2` when training is
bounded by `trainer.max_steps` (max_epochs = -1). This bar shows the step budget instead.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepBudgetProgressBar(RichProgressBar):
    """`Epoch 3/9` when epochs bound the run, `Epoch 3 · max_steps 8000` when steps do."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        max_steps = self.trainer.max_steps
        description = f"Epoch {current_epoch}" + (
            f" · max_steps {max_steps}" if max_steps > 0 else ""
        )
        return f"{description:{len(self.validation_description)}}"  # pad: no flicker
