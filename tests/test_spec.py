"""The data contracts of `advarch/spec.py`: the stream and trainer-override protocols that
strategies and train.py call, implemented by the datamodules without probing."""

from __future__ import annotations

import pytest

from advarch.data.digits import (
    DigitsDataModule,
    PermutedDigitsDataModule,
    RotatedDigitsDataModule,
    SplitDigitsDataModule,
)
from advarch.spec import ConfiguresTrainer, TaskSchedule, TaskStream


@pytest.mark.parametrize(
    "stream", [PermutedDigitsDataModule, SplitDigitsDataModule, RotatedDigitsDataModule]
)
def test_digit_streams_implement_the_task_stream_protocol(stream) -> None:
    dm = stream(num_tasks=2, epochs_per_task=2)
    assert isinstance(dm, TaskStream) and isinstance(dm, ConfiguresTrainer)
    assert dm.schedule == TaskSchedule(2, 2)
    assert dm.trainer_overrides == {
        "max_epochs": 4,
        "reload_dataloaders_every_n_epochs": 1,
        "max_steps": -1,
    }


def test_a_plain_datamodule_is_not_a_stream() -> None:
    dm = DigitsDataModule()
    assert not isinstance(dm, TaskStream) and not isinstance(dm, ConfiguresTrainer)


def tasks_of_an_epoch(dm: PermutedDigitsDataModule) -> tuple[set[int], int]:
    batches = list(dm.train_dataloader())
    return {int(t) for b in batches for t in b["task"]}, len(batches)


def test_train_jointly_serves_every_task_in_one_epoch_of_the_same_length() -> None:
    dm = PermutedDigitsDataModule(num_tasks=2, batch_size=64)
    dm.setup("fit")
    sequential, n = tasks_of_an_epoch(dm)
    assert sequential == {0}  # no trainer: epoch 0, task 0
    dm.train_jointly(True)
    joint, n_joint = tasks_of_an_epoch(dm)
    assert joint == {0, 1} and n_joint == n  # as many optimizer steps as a task's epoch
    assert "train_dataloader" not in vars(dm)  # a switch on the stream, not a patched method
    dm.train_jointly(False)
    assert tasks_of_an_epoch(dm)[0] == {0}
