"""A shuffling sampler whose order depends only on (seed, epoch), and that can resume mid-epoch.

A plain `RandomSampler` with a generator continues its random stream across epochs, so a run
resumed from a checkpoint would see a different order than the uninterrupted run. Here epoch e
always sees permutation(seed, e), and a resumed run skips the batches it already trained on,
on one process or several (DDP).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler, ABC):
    """An epoch's order of `size` indices (`epoch_order`, a pure function of the epoch), or
    process `rank`'s share of it; `skip` drops the first items of epoch `epoch` (the one a
    resumed run is in) and of no other.

    Of `world` processes (DDP), process `rank` takes every world-th index of the order, cut to
    a multiple of `world` so that all take as many: the global batch is the one a single
    process would take. It is a `DistributedSampler` so that Lightning does not wrap it in its
    own, which shuffles again with a seed of its own: a resumed epoch, shorter by its skip,
    then saw other batches than the uninterrupted run (and the next epoch, the skip gone,
    stopped on the wrapper's fixed shard size). The skip counts every process's samples.

    The length is the whole epoch's share, skip or not: Lightning counts a resumed epoch's
    batches on from its restored progress and ends the epoch at the loader's length, so a
    length short by the skip ended it that many batches early (a silently different run).
    """

    def __init__(self, size: int, skip: int = 0, epoch: int = 0, rank: int = 0,
                 world: int = 1) -> None:  # fmt: skip
        # not DistributedSampler.__init__: it asks torch.distributed for the world
        self.size, self.skip, self.epoch, self.skip_epoch = size, skip, epoch, epoch
        self.rank, self.num_replicas = rank, world

    @abstractmethod
    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The (size,) indices of `epoch`, in order."""

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch."""
        self.epoch = epoch

    def _skipped(self) -> int:
        return self.skip if self.epoch == self.skip_epoch else 0

    def __iter__(self) -> Iterator[int]:
        whole = self.size // self.num_replicas * self.num_replicas  # as many for every process
        order = self.epoch_order(self.epoch)[self._skipped() : whole]
        return iter(order[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.size // self.num_replicas


class EpochShuffleSampler(EpochSampler):
    """Indices 0..n−1 in a (seed, epoch)-determined order (`EpochSampler`: resumable, shared
    among DDP processes). `num_samples` (default n) draws that many an epoch: the first of the
    epoch's permutation (a random subset without replacement), or, more than n, successive
    permutations (each index as often as the others, ±1): an epoch of a fixed number of
    steps (`data.steps_per_task`) trains all of them on a small set too."""

    def __init__(
        self, n: int, seed: int, skip: int = 0, epoch: int = 0, num_samples: int | None = None,
        rank: int = 0, world: int = 1,
    ) -> None:  # fmt: skip
        super().__init__(n if num_samples is None else num_samples, skip, epoch, rank, world)
        self.n, self.seed = n, seed

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        passes = -(-self.size // max(self.n, 1))  # (the first: a smaller epoch's whole order)
        return torch.cat([torch.randperm(self.n, generator=g) for _ in range(passes)])[: self.size]


class EvalShardSampler(DistributedSampler):
    """Process `rank`'s share of `n` evaluation items, in order: every `world`-th index from
    `rank`, so each item is evaluated by exactly one process.

    Lightning's own `DistributedSampler` evens the shares by repeating up to world−1 items,
    which then count twice in validation and test metrics. Unequal shares are exact: the
    metrics are torchmetrics, whose synced states add up whatever each process saw.
    """

    def __init__(self, n: int, rank: int, world: int) -> None:
        # not DistributedSampler.__init__: it asks torch.distributed for the world
        self.n, self.rank, self.num_replicas, self.epoch, self.shuffle = n, rank, world, 0, False

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


def eval_sampler(n: int, trainer: object | None) -> EvalShardSampler | None:
    """This process's evaluation sampler over `n` items under plain DDP; None (Lightning's
    sampler: all items in order on one process, even shares otherwise) where unequal shares
    would hang:
    - fewer items than processes: a process with none would skip the metrics' sync the
      others wait in;
    - a strategy that shards the weights (FSDP, DeepSpeed): every forward gathers them from
      all processes, so a process with one batch more would wait for the others forever.
    """
    where = shard(trainer)
    plain_ddp = type(getattr(trainer, "strategy", None)).__name__ == "DDPStrategy"
    if where["world"] == 1 or n < where["world"] or not plain_ddp:
        return None
    return EvalShardSampler(n, **where)


def shard(trainer: object | None) -> dict[str, int]:
    """This process's `rank` among the trainer's `world` of processes (0 of 1 without one)."""
    return {
        "rank": int(getattr(trainer, "global_rank", 0) or 0),
        "world": int(getattr(trainer, "world_size", 1) or 1),
    }


def samples_done_this_epoch(trainer: object | None, batch_size: int) -> int:
    """Training samples already consumed in the current epoch by all processes together
    (non-zero when resuming mid-epoch): what a resumed epoch's sampler skips.

    Each of the world's processes took `batch_size` per batch from its share of the sampler's
    order (`EpochShuffleSampler` deals it out rank by rank). Lightning knows a resume
    is mid-epoch only after it restored its loops, which is after the train loader was first
    built (`estimated_stepping_batches` builds it when optimizers are configured);
    `resume_train_epoch` makes it build the loader again.
    """
    loop = getattr(trainer, "fit_loop", None)
    if loop is None or not loop.restarted_mid_epoch:
        return 0
    batches = int(loop.epoch_loop.batch_progress.current.ready)
    return batches * batch_size * shard(trainer)["world"]


def resume_train_epoch(trainer: object) -> None:
    """On a resumed fit, train the restored epoch's remaining batches exactly as the
    uninterrupted run would. Call from `on_train_start` (the loops are restored by then).

    - Lightning builds the train loader before it restores its loops: drop it, so that
      `fit_loop.setup_data` builds it again for the restored epoch, skipping the batches that
      epoch already trained on (Lightning has no public switch for this).
    - A checkpoint written at an epoch's last batch (before its end hooks) resumes in the next
      epoch, but Lightning still flags that epoch as restarted mid-epoch: it would skip its
      start hooks (a continual stream's task switch) and count its batches as done. Clear the
      flag, so the epoch starts as in the uninterrupted run.
    - A checkpoint of a fit that had ended with its epoch (the final one, resumed with a
      higher `trainer.max_steps`), or written as an epoch started (a stop signal heard at the
      last one's last batch): Lightning restarted the ended epoch, found its batches done,
      ran it empty and went on an epoch and a step later (step 7 of epoch 3 after step 5 of
      epoch 1). Its next epoch starts afresh, as the uninterrupted run's does.
    """
    if not getattr(trainer, "ckpt_path", None):
        return
    loop = trainer.fit_loop
    progress = loop.epoch_progress
    if loop.restarted_mid_epoch and progress.total.processed == progress.total.started:
        loop.reset_restart_stage()
    ended = progress.total.completed == progress.total.ready  # (no epoch was in progress)
    if loop.restarted_on_epoch_start:  # (Lightning's reset_on_restart left current.ready behind)
        progress.current.ready = progress.current.completed + 1
    if (ended or loop.restarted_on_epoch_start) and loop.epoch_loop.restarted_on_last:
        loop.epoch_loop.reset_restart_stage()
        loop.epoch_loop.restarting = False
    loop._combined_loader = None


def data_loader(dataset: Dataset, seed: int, **options: object) -> DataLoader:
    """A `DataLoader` whose worker seeds come from a generator of its own (from `seed`):
    building its iterator, each epoch and each validation, draws nothing from the global
    random state, which dropout and router noise draw from. Those draws then follow the
    training steps alone, and a resume that sets the saved states back draws what the
    uninterrupted run draws (`callbacks.random_state`)."""
    return DataLoader(dataset, generator=torch.Generator().manual_seed(seed), **options)


def resumable_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    trainer: object | None,
    num_samples: int | None = None,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A shuffled training loader for the trainer's current epoch, built fresh every epoch.

    Its order is a pure function of (`seed`, `trainer.current_epoch`), and a run resumed
    mid-epoch skips the batches it already trained on, so a resumed run sees exactly the
    batches of the uninterrupted one (`data_loader`: nor does it draw from the global random
    state).
    """
    epoch = int(getattr(trainer, "current_epoch", 0) or 0)
    skip = samples_done_this_epoch(trainer, batch_size)
    sampler = EpochShuffleSampler(len(dataset), seed, skip, epoch, num_samples, **shard(trainer))
    return data_loader(
        dataset,
        seed,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
    )
