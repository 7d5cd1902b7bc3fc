"""The task-stream contract: a datamodule whose training task changes at epoch boundaries.

One `trainer.fit` trains a whole stream. Contract with the Trainer (train.py applies
`trainer_overrides`):

- `Trainer(max_epochs=num_tasks * epochs_per_task, reload_dataloaders_every_n_epochs=1,
  max_steps=-1)`: the stream decides the length (`trainer.max_steps` is ignored;
  `trainer.limit_train_batches` caps the batches of every epoch, which is how `debug=tiny`
  runs every task in a few steps).
- `train_dataloader()` serves the task of the trainer's current epoch (`self.schedule`, a
  pure function of the epoch Lightning restores from a checkpoint), `epoch_samples(task)`
  examples shuffled by (seed + task, epoch) and skipping batches a resumed epoch already
  trained on, so a resumed run trains exactly what the uninterrupted run would. Continual
  strategies finish a task (EWC consolidates) in `on_train_epoch_end` when
  `schedule.ends_task(epoch)`.
- `val_dataloader()` / `test_dataloader()` return one loader PER TASK, always all tasks (seen
  and unseen), so `dataloader_idx == task id`.
- `data[split][task]` holds each task's dataset; `task_loader(split, task, ...)` batches it the
  way the stream's own loaders do (strategies use it for the Fisher), and
  `joint_train_loader()` draws an epoch from all tasks at once (the joint upper bound), which
  `train_dataloader()` serves after `train_jointly(True)`.

Implemented by the digits streams (`advarch/data/digits.py`) and the text-domain stream
(`advarch/data/text_domains.py`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from torch.utils.data import ConcatDataset, DataLoader

from advarch.data.sampling import resumable_loader
from advarch.spec import TaskSchedule


class TaskStreamMixin:
    """Mixin for LightningDataModules that present a stream of tasks (module docstring); it
    implements the `advarch.spec.TaskStream` protocol the continual strategies call.

    Subclasses set `schedule` (and `num_tasks`, `epochs_per_task` as in it), `batch_size`,
    `seed`, `num_workers` and `data`, and define `task_loader`.
    """

    schedule: TaskSchedule
    num_tasks: int
    epochs_per_task: int
    batch_size: int
    seed: int
    num_workers: int
    data: dict[str, list[Any]]
    trainer: Any
    collate_fn: Any = None  # how rows become batches (None: torch's default collate)
    joint: bool = False  # every epoch from all tasks (`train_jointly`, strategy.joint=true)

    @property
    def max_epochs(self) -> int:
        """Epochs of the whole stream: `num_tasks * epochs_per_task` (the Trainer's max_epochs)."""
        return self.schedule.max_epochs

    @property
    def trainer_overrides(self) -> dict[str, int]:
        """The Trainer arguments of the contract above (train.py applies them)."""
        return {**self.schedule.trainer_overrides, "max_steps": -1}

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during `epoch` (clamped to the last task)."""
        return self.schedule.task_of_epoch(epoch)

    @property
    def current_task(self) -> int:
        """The task of the attached trainer's current epoch, 0 without a trainer."""
        return 0 if self.trainer is None else self.task_of_epoch(self.trainer.current_epoch)

    @abstractmethod
    def task_loader(
        self, split: str, task: int, batch_size: int, shuffle: bool, seed: int
    ) -> DataLoader:
        """Batches of task `task`'s `split` set, shuffled reproducibly from `seed` if asked."""

    def epoch_samples(self, task: int) -> int:
        """Training examples one epoch of task `task` draws (its whole training set here)."""
        return len(self.data["train"][task])

    def train_jointly(self, joint: bool) -> None:
        """Serve `joint_train_loader` as every training epoch (the joint upper bound) or not."""
        self.joint = joint

    def train_dataloader(self) -> DataLoader:
        if self.joint:
            return self.joint_train_loader()
        task = self.current_task
        return self._resumable(self.data["train"][task], self.seed + task, self.epoch_samples(task))

    def joint_train_loader(self) -> DataLoader:
        """The joint upper bound's epoch: a random draw from ALL tasks' training sets, as many
        examples as one task's epoch on average (so the optimizer steps match the stream's)."""
        samples = sum(self.epoch_samples(t) for t in range(self.num_tasks)) // self.num_tasks
        return self._resumable(ConcatDataset(self.data["train"]), self.seed, samples)

    def _resumable(self, dataset: Any, seed: int, samples: int) -> DataLoader:
        return resumable_loader(
            dataset,
            self.batch_size,
            seed,
            self.trainer,
            num_samples=samples,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
        )

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        tasks = range(self.num_tasks)
        return [self.task_loader(split, t, self.batch_size, False, 0) for t in tasks]
