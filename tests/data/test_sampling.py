"""The stream schedule and the resumable loaders: pure functions of the (restored) epoch."""

from __future__ import annotations

import torch

from advarch.data.sampling import EpochShuffleSampler, eval_sampler, resumable_loader
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


def test_an_epoch_longer_than_the_set_draws_it_again_and_again() -> None:
    # a domain smaller than data.steps_per_task × batch_size trained fewer steps, silently
    small = EpochShuffleSampler(7, seed=3, epoch=1, num_samples=20)
    order = list(small)
    assert len(small) == 20 and len(order) == 20
    assert order[:7] == list(EpochShuffleSampler(7, seed=3, epoch=1))  # its first pass
    assert sorted(order[7:14]) == list(range(7)) and sorted(order[14:]) != list(range(7))
    counts = [order.count(i) for i in range(7)]
    assert max(counts) - min(counts) <= 1  # each as often as the others
    assert order == list(EpochShuffleSampler(7, seed=3, epoch=1, num_samples=20))  # (pure)


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
    assert list(resumed) == full[20:] == list(resumed)  # its epoch's
    # the whole epoch's length: Lightning counts on from its restored progress (a length short
    # by the skip ended a resumed epoch that many batches early)
    assert len(resumed) == 50
    resumed.set_epoch(1)
    assert list(resumed) == list(EpochShuffleSampler(50, seed=1, epoch=1))  # and no other's
    s = EpochShuffleSampler(50, seed=1)
    s.set_epoch(1)
    assert list(s) != full


def test_ddp_processes_share_the_order_and_a_resumed_epoch_continues_it() -> None:
    # Lightning wrapped the sampler in its own distributed one, which shuffled again: a resumed
    # epoch (shorter by its skip) saw other batches, and the next one stopped on an
    # AssertionError (the wrapper's shard size was fixed when it was built)
    from types import SimpleNamespace

    from torch.utils.data import DistributedSampler

    from advarch.data.sampling import samples_done_this_epoch

    world, batch, done = 2, 3, 2
    progress = SimpleNamespace(current=SimpleNamespace(ready=done))
    epoch_loop = SimpleNamespace(batch_progress=progress)
    loop = SimpleNamespace(restarted_mid_epoch=True, epoch_loop=epoch_loop)
    skip = samples_done_this_epoch(SimpleNamespace(fit_loop=loop, world_size=world), batch)
    one = list(EpochShuffleSampler(25, seed=5))
    for rank in range(world):
        full = EpochShuffleSampler(25, seed=5, rank=rank, world=world)
        assert isinstance(full, DistributedSampler)  # so Lightning does not wrap it
        assert list(full) == one[rank:24:world] and len(full) == 12  # as many for each
        resumed = EpochShuffleSampler(25, seed=5, skip=skip, rank=rank, world=world)
        assert list(resumed) == list(full)[done * batch :] and len(resumed) == 12
        resumed.set_epoch(1)  # the next epoch whole
        assert list(resumed) == one_epoch(1, rank, world) and len(resumed) == 12


def one_epoch(epoch: int, rank: int, world: int) -> list[int]:
    return list(EpochShuffleSampler(25, seed=5, epoch=epoch))[rank : 25 // world * world : world]


class DDPStrategy:  # Lightning's plain DDP, by name
    pass


class _Process:  # what eval_sampler reads of a trainer
    def __init__(self, rank: int, world: int, strategy: object | None = None) -> None:
        self.global_rank, self.world_size = rank, world
        self.strategy = DDPStrategy() if strategy is None else strategy


def test_evaluation_shares_count_every_example_once() -> None:
    # Lightning's DistributedSampler evens 7 examples on 2 processes as 4 + 4: one twice
    shares = [list(eval_sampler(7, _Process(rank, 2))) for rank in range(2)]
    assert shares == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(eval_sampler(7, _Process(rank, 2))) for rank in range(2)] == [4, 3]
    assert eval_sampler(7, _Process(0, 1)) is None  # one process: all of them, in order
    # fewer examples than processes: Lightning's sampler, so that no process has none (a
    # process without batches would not join the metrics' sync the others wait in)
    assert eval_sampler(1, _Process(0, 2)) is None
    # FSDP gathers the weights in every forward: a process with a batch more would hang
    assert eval_sampler(7, _Process(0, 2, strategy=object())) is None
