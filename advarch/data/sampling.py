"""A shuffling sampler whose order depends only on (seed, epoch), and that can resume mid-epoch.

A plain `RandomSampler` with a generator continues its random stream across epochs, so a run
resumed from a checkpoint would see a different order than the uninterrupted run. Here epoch e
always sees permutation(seed, e), and a resumed run skips the batches it already trained on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochShuffleSampler(Sampler[int]):
    """Indices 0..n−1 in a (seed, epoch)-determined order; `skip` drops the first items once.

    `length` draws that many indices per epoch instead of n (successive permutations when
    it exceeds n): an epoch of a fixed number of steps over a large set (a task stream's
    steps per task).
    """

    def __init__(self, n: int, seed: int, skip: int = 0, length: int | None = None) -> None:
        self.n, self.seed, self.skip, self.epoch = n, seed, skip, 0
        self.length = n if length is None else length

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        rounds = -(-self.length // self.n)  # ceil
        order = torch.cat([torch.randperm(self.n, generator=g) for _ in range(rounds)])
        order = order[self.skip : self.length]
        self.skip = 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.length - self.skip


def batches_done_this_epoch(trainer: object | None) -> int:
    """Training batches already consumed in the current epoch (non-zero when resuming)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    if loop is None or not getattr(loop, "restarting", False):
        return 0
    return int(loop.batch_progress.current.ready)
