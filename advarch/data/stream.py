"""The task-stream contract: a datamodule whose training task changes at epoch boundaries.

One `trainer.fit` trains a whole stream. Contract with the Trainer (train.py applies
`trainer_overrides`):

- `Trainer(max_epochs=num_tasks * epochs_per_task, reload_dataloaders_every_n_epochs=
  epochs_per_task, max_steps=-1)`: the stream decides the length (`trainer.max_steps` is
  ignored; `trainer.limit_train_batches` caps the batches of every epoch, which is how
  `debug=tiny` runs every task in a few steps).
- `train_dataloader()` serves the CURRENT task: `task_of_epoch(trainer.current_epoch)` (0 with
  no trainer attached), clamped to the last task. Lightning re-calls it every
  `epochs_per_task` epochs, so the task switches exactly at task boundaries; continual
  strategies consolidate in `on_train_epoch_end` when `task_of_epoch(epoch + 1)` changes.
- `val_dataloader()` / `test_dataloader()` return one loader PER TASK, always all tasks (seen
  and unseen), so `dataloader_idx == task id`.
- `data[split][task]` holds each task's dataset; `task_loader(split, task, ...)` batches it the
  way the stream's own loaders do (strategies use it for the Fisher and the joint bound), and
  `epoch_samples(task)` is how many training examples one epoch of that task draws, and
  `joint_train_loader(epoch)` draws that many from all tasks at once (the joint bound).

Implemented by the digits streams (`advarch/data/digits.py`) and the text-domain stream
(`advarch/data/text_domains.py`).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, RandomSampler


class TaskStream:
    """Mixin for LightningDataModules that present a stream of tasks (module docstring).

    Subclasses set `num_tasks`, `epochs_per_task` and `data`, and define `task_loader`.
    """

    num_tasks: int
    epochs_per_task: int
    batch_size: int
    seed: int
    data: dict[str, list[Any]]
    trainer: Any
    collate_fn: Any = None  # how rows become batches (None: torch's default collate)

    @property
    def max_epochs(self) -> int:
        """Epochs of the whole stream: `num_tasks * epochs_per_task` (the Trainer's max_epochs)."""
        return self.num_tasks * self.epochs_per_task

    @property
    def trainer_overrides(self) -> dict[str, int]:
        """The Trainer arguments of the contract above (train.py applies them)."""
        return {
            "max_epochs": self.max_epochs,
            "max_steps": -1,
            "reload_dataloaders_every_n_epochs": self.epochs_per_task,
        }

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained during `epoch` (clamped to the last task)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

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

    def joint_train_loader(self, epoch: int) -> DataLoader:
        """The joint upper bound's epoch: a random draw from ALL tasks' training sets, as many
        examples as one task's epoch on average (so the optimizer steps match the stream's)."""
        data = ConcatDataset(self.data["train"])
        samples = sum(self.epoch_samples(t) for t in range(self.num_tasks)) // self.num_tasks
        sampler = RandomSampler(
            data, num_samples=samples, generator=torch.Generator().manual_seed(self.seed + epoch)
        )
        return DataLoader(
            data, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_fn
        )

    def train_dataloader(self) -> DataLoader:
        task = self.current_task
        return self.task_loader("train", task, self.batch_size, True, self.seed + task)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        tasks = range(self.num_tasks)
        return [self.task_loader(split, t, self.batch_size, False, 0) for t in tasks]
