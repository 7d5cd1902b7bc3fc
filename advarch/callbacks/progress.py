"""A Rich progress bar that reads right in step-budgeted runs and in log files.

Lightning labels the bar `Epoch e/max_epochs-1`, which prints `Epoch 3/-2` when training is
bounded by `trainer.max_steps` (max_epochs = -1); this bar shows the step budget instead, and
counts (with its time left) towards the end of the budget, not of the current epoch. It
leaves out Lightning's logger version (`v_num`), and where the output is not a terminal (a
log file, a pipe, CI) it draws its final frame as one line however many metrics it shows: at
Rich's default 80 columns (or any fixed width) they wrapped onto a line of their own, padded
to the width with spaces. There, where Rich draws only that final frame, it also logs a
progress line every tenth of the run (`step 30/300 · 0:00:19 elapsed, 0:02:51 left ·
train/loss 2.930`), so that a log followed with `tail -f` shows that the run is alive and when
it will end.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from lightning.pytorch.callbacks import RichProgressBar
from rich.markup import escape
from rich.progress import TextColumn

from advarch.console_log import console_width, progress_line
from advarch.spec import TaskStream

log = logging.getLogger("advarch")
LOGGED_STEPS = 50  # shorter runs log no progress lines
UNBOUNDED = 100_000  # the bar's width in a log file: its frame is as long as its content


class StepBudgetProgressBar(RichProgressBar):
    """`Epoch 3/9` when epochs bound the run, `Epoch 3 · max_steps 8000` when steps do, after
    the task of a continual stream (`task 2/5 (perm1) · Epoch 3/9`); a sweep's trial names
    itself in front of every bar (`NamesItsRun`)."""

    run_label: str | None = None

    def __init__(self, *args: Any, console_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        console_kwargs = dict(console_kwargs or {})
        if console_width() is not None:  # (its table is not expanded: no padding to the width)
            console_kwargs.setdefault("width", UNBOUNDED)
        super().__init__(*args, console_kwargs=console_kwargs, **kwargs)

    def _step_budget(self) -> int | None:
        """The run's training batches when `max_steps` alone bounds it, else None: under
        gradient accumulation an epoch's last batch steps too (`steps_budget_batches`)."""
        trainer = self.trainer
        if trainer.max_steps > 0 and (trainer.max_epochs is None or trainer.max_epochs < 0):
            epoch = trainer.num_training_batches
            return steps_budget_batches(trainer.max_steps, trainer.accumulate_grad_batches, epoch)
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

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._started = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_budget():  # the run's batches so far (a resumed run's included)
            batch_idx = trainer.fit_loop.epoch_loop.total_batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # not a terminal: the bar shows only its last frame; a line a step, not one a process
        if console_width() is not None and trainer.is_global_zero:
            self._log_progress(trainer, pl_module)

    def _log_progress(self, trainer: Any, pl_module: Any) -> None:
        """A plain progress line at every tenth of the run's optimizer steps (runs of at
        least LOGGED_STEPS steps: a smoke run's bar is enough)."""
        total, step = trainer.estimated_stepping_batches, trainer.global_step
        if not (math.isfinite(total) and total >= LOGGED_STEPS):  # (an endless run: no end)
            return
        if not step or step % (int(total) // 10) or step == getattr(self, "_logged_step", None):
            return  # (accumulated batches end at the same step)
        self._logged_step = step
        since, first = self._started
        where = progress_line(step, int(total), since, first)
        loss = trainer.callback_metrics.get("train/loss")
        shown = "" if loss is None else f" · train/loss {_decimals(float(loss))}"
        label = f"{self.run_label} · " if self.run_label else ""  # (a parallel sweep's trial)
        log.info("%sstep %s%s", label, where, shown)

    def _get_train_description(self, current_epoch: int) -> str:
        task = task_label(getattr(self.trainer, "datamodule", None), current_epoch)
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            description = super()._get_train_description(current_epoch)
        else:
            max_steps = self.trainer.max_steps
            description = f"Epoch {current_epoch}" + (
                f" · max_steps {max_steps}" if max_steps > 0 else ""
            )
            description = f"{description:{len(self.validation_description)}}"  # no flicker
        return f"{task} · {description}" if task else description

    def configure_columns(self, trainer: Any) -> list:
        columns = super().configure_columns(trainer)
        if not self.run_label:
            return columns
        # (TextColumn formats its text: a trial's `model.moe={…}` braces are literal)
        label = escape(self.run_label).replace("{", "{{").replace("}", "}}")
        return [TextColumn(label), *columns]

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        """The logged progress-bar metrics, without the logger's version number."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


def _decimals(value: float) -> str:
    """3 decimals in every line (`4.600`, not `4.6` beside `4.13`); a tiny value in E form."""
    return f"{value:.3f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2e}"


def steps_budget_batches(max_steps: int, accumulate: int, epoch_batches: int | float) -> int:
    """The batches `max_steps` optimizer steps take, `accumulate` batches a step, where every
    epoch of `epoch_batches` ends with a step (3 batches by 2: 2 steps, so 6 steps take 9)."""
    if not math.isfinite(epoch_batches) or epoch_batches < 1:  # (an iterable of unknown length)
        return max_steps * accumulate
    epoch_steps = math.ceil(epoch_batches / accumulate)
    epochs, steps = divmod(max_steps, epoch_steps)
    return int(epochs * epoch_batches + min(steps * accumulate, epoch_batches))


def task_label(datamodule: Any, epoch: int) -> str:
    """`task 2/5 (perm1)`: the task a stream trains in `epoch` (its boundaries are a continual
    run's moments to watch); '' for other data, or a stream trained on all tasks at once."""
    if not isinstance(datamodule, TaskStream) or getattr(datamodule, "joint", False):
        return ""
    schedule = datamodule.schedule
    task = schedule.task_of_epoch(epoch)
    names = getattr(getattr(datamodule, "spec", None), "task_names", ())
    name = f" ({names[task]})" if len(names) == schedule.num_tasks else ""
    return f"task {task + 1}/{schedule.num_tasks}{name}"
