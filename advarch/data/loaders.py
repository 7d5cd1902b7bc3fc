"""Generic in-memory datasets and loaders shared by the datamodules (digits, synthetic tasks,
MMoE, episodes): an HF `datasets.Dataset` of numpy columns and a reproducibly shuffled
`DataLoader` over it.
"""

from __future__ import annotations

import datasets
import numpy as np
from torch.utils.data import DataLoader

from advarch.data.sampling import data_loader, eval_sampler


def make_dataset(columns: dict[str, np.ndarray]) -> datasets.Dataset:
    """An in-memory HF Dataset of numpy columns, returning torch tensors."""
    return datasets.Dataset.from_dict(columns).with_format("torch")


def make_loader(
    dataset: datasets.Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    trainer: object | None = None,
) -> DataLoader:
    """A batching DataLoader; when shuffling, the order is reproducible from `seed`, else it
    is in order, `trainer`'s process taking its own share (`eval_sampler`)."""
    return data_loader(
        dataset,
        seed,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=None if shuffle else eval_sampler(len(dataset), trainer),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
