"""The stream schedule and the resumable loaders: pure functions of the (restored) epoch."""

from __future__ import annotations

import torch

from advarch.data.sampling import EpochShuffleSampler, resumable_loader
from advarch.spec import TaskSchedule


def test_schedule_is_a_pure_function_of_the_epoch() -> None:
    s = TaskSchedule(num_tasks=3, epochs_per_task=2)
    assert [s.task_of_epoch(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert [s.ends_task(e) for e in range(6)] == [False, True, False, True, False, True]
    assert s.trainer_overrides == {"max_epochs": 6, "reload_dataloaders_every_n_epochs": 1}


def test_subset_sampler_keeps_a_prefix_of_the_epoch_permutation() -> None:
    full = list(EpochShuffleSampler(40, seed=3, epoch=2))
    part = EpochShuffleSampler(40, seed=3, epoch=2, num_samples=10)
    assert list(part) == full[:10] and len(part) == 10
    assert list(EpochShuffleSampler(40, seed=3, epoch=2, skip=4, num_samples=10)) == full[4:10]
    assert list(EpochShuffleSampler(40, seed=3, epoch=3)) != full


class _Trainer:  # what resumable_loader reads of a trainer
    def __init__(self, epoch: int) -> None:
        self.current_epoch = epoch


def test_resumable_loader_order_depends_only_on_seed_and_epoch() -> None:
    data = torch.arange(20)
    torch.manual_seed(0)
    first = [b.tolist() for b in resumable_loader(data, 5, seed=7, trainer=_Trainer(4))]
    torch.manual_seed(123)  # the global random state plays no part
    again = [b.tolist() for b in resumable_loader(data, 5, seed=7, trainer=_Trainer(4))]
    other = [b.tolist() for b in resumable_loader(data, 5, seed=7, trainer=_Trainer(5))]
    assert first == again and first != other
    assert sorted(sum(first, [])) == list(range(20))


def test_resumed_sampler_skips_consumed_batches() -> None:
    full = list(EpochShuffleSampler(50, seed=1))
    resumed = EpochShuffleSampler(50, seed=1, skip=20)
    assert list(resumed) == full[20:]
    assert list(resumed) == full  # the skip applies once
    s = EpochShuffleSampler(50, seed=1)
    s.set_epoch(1)
    assert list(s) != full
