"""A Rich progress bar that reads right in step-budgeted runs and in log files.

Lightning labels the bar `Epoch e/max_epochs-1`, which prints `Epoch 3/-2` when training is
bounded by `trainer.max_steps` (max_epochs = -1); this bar shows the step budget instead, and
counts (with its time left) towards the end of the budget, not of the current epoch. It
leaves out Lightning's logger version (`v_num`), and where the output is not a terminal (a
log file, a pipe, CI) it draws its final frame wide enough for the metrics to stay on one line
instead of Rich's default 80 columns, which wrap them mid-pair.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichProgressBar

from advarch.console_log import console_width


class StepBudgetProgressBar(RichProgressBar):
    """`Epoch 3/9` when epochs bound the run, `Epoch 3 · max_steps 8000` when steps do."""

    def __init__(self, *args: Any, console_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        console_kwargs = dict(console_kwargs or {})
        if console_width() is not None:
            console_kwargs.setdefault("width", console_width())
        super().__init__(*args, console_kwargs=console_kwargs, **kwargs)

    def _step_budget(self) -> int | None:
        """The run's training batches when `max_steps` alone bounds it, else None."""
        trainer = self.trainer
        if trainer.max_steps > 0 and (trainer.max_epochs is None or trainer.max_epochs < 0):
            return trainer.max_steps * trainer.accumulate_grad_batches
        return None

    @property
    def total_train_batches(self) -> int | float:
        return self._step_budget() or super().total_train_batches

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """A step-budgeted run keeps one bar over all its epochs: only its label changes."""
        if self._step_budget() and self.train_progress_bar_id is not None and self.progress:
            label = self._get_train_description(trainer.current_epoch)
            self.progress.update(self.train_progress_bar_id, description=label)
            self.refresh()
            return
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_budget():  # the run's batches so far (a resumed run's included)
            batch_idx = trainer.fit_loop.epoch_loop.total_batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        max_steps = self.trainer.max_steps
        description = f"Epoch {current_epoch}" + (
            f" · max_steps {max_steps}" if max_steps > 0 else ""
        )
        return f"{description:{len(self.validation_description)}}"  # pad: no flicker

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The logged progress-bar metrics, without the logger's version number."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
