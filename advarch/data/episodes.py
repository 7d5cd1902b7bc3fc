"""Few-shot episodes (N-way K-shot) over class-disjoint splits, and a many-class synthetic set.

Episodes follow Vinyals et al. 2016 / Snell et al. 2017 (Prototypical Networks): each samples
N classes of one split, K support and Q query examples per class, and relabels the N classes
0..N-1. The relabelling follows the RANDOM order in which the classes were drawn, never their
sorted ids: sorted assignment leaks class identity into episode labels (a model could learn
"smallest class id -> label 0").

Sources (`source`):

- `rotated_digits`: the 1,797 digits under 4 rotations, class `rotation * 10 + digit` (40
  classes, see `advarch.data.digits.rotated_class`), split BY DIGIT so no digit shape is shared
  across splits: digits 0-5 train (24 classes), 6-7 val (8), 8-9 test (8). All images of a
  digit are used (the shared image split of the continual streams does not apply). Some test
  classes are near-duplicates by symmetry (8 at 0 vs 180 degrees), which caps test accuracy.
- `synthetic`: `synthetic_fewshot` below, 60/20/20 of the classes for train/val/test.

Episode batch (the DataLoader yields ONE episode per batch, no collation):
`support` (N*K, F) or (N*K, T), label-major so `support.view(N, K, -1)` groups a class;
`support_labels` (N*K,); `query` (N*Q, ...) in shuffled order; `query_labels` (N*Q,);
`classes` (N,) the split-level class id of each episode label (for analysis only; a model
must not read it).

Train episodes change every epoch (episode ids `epoch * episodes_per_epoch + j`); val and
test episodes are fixed seeded sets, so every evaluation sees the same episodes.

Shapes: N ways, K shots, Q queries per class, F features, T tokens, C classes, S signal dims.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import datasets
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from advarch.data.digits import (
    NUM_DIGITS,
    NUM_ROTATIONS,
    InputFormat,
    check_input_format,
    encode_images,
    input_shape_fields,
    load_digit_arrays,
    rotated_digits,
)
from advarch.data.loaders import make_dataset
from advarch.data.sampling import (
    EpochSampler,
    data_loader,
    eval_sampler,
    samples_done_this_epoch,
    shard,
)
from advarch.spec import DataSpec

Source = Literal["rotated_digits", "synthetic"]
SPLITS = ("train", "val", "test")
ROTATED_DIGIT_SPLITS = {"train": range(0, 6), "val": range(6, 8), "test": range(8, 10)}


@dataclass(frozen=True)
class SyntheticFewShotSet:
    """A many-class feature set whose class signal lives in a hidden low-dim subspace.

    Attributes:
        features: (C * per_class, F) float32 inputs.
        classes: (C * per_class,) int64 class ids, class-major.
        signal_basis: (F, S) orthonormal columns spanning the signal subspace:
            `features @ signal_basis` recovers the signal coordinates exactly.
    """

    features: np.ndarray
    classes: np.ndarray
    signal_basis: np.ndarray


def check_synthetic(signal_dims: int, noise_dims: int, signal_std: float, noise_std: float
                    ) -> None:  # fmt: skip
    """ValueError naming the first synthetic-set option out of range (NaN included)."""
    lowest = {"signal_dims": (signal_dims, 1), "noise_dims": (noise_dims, 0),
              "signal_std": (signal_std, 0), "noise_std": (noise_std, 0)}  # fmt: skip
    for key, (value, low) in lowest.items():
        if not value >= low:
            raise ValueError(f"data.{key}={value} must be >= {low}")


def synthetic_fewshot(
    num_classes: int = 200,
    samples_per_class: int = 60,
    signal_dims: int = 8,
    noise_dims: int = 56,
    signal_std: float = 0.55,
    noise_std: float = 1.5,
    seed: int = 0,
) -> SyntheticFewShotSet:
    """Draw the synthetic few-shot set.

    Class c has a prototype mu_c ~ N(0, I_S); its examples are `[mu_c + signal_std * n_s,
    noise_std * n_z]` (n ~ N(0, I); S signal and `noise_dims` noise coordinates), then a random
    orthogonal matrix Q mixes all coordinates so no single input feature is pure signal:
    x = Q [s; z]. Euclidean distances are unchanged by Q, so a raw-feature ProtoNet drowns in
    the noise dims, while a linear projection onto Q[:, :S] removes them. With the defaults
    (tuned by measurement), 5-way 1-shot raw prototypes reach ~0.31 and projected ones ~0.92.
    """
    rng = np.random.default_rng(seed)
    width = signal_dims + noise_dims
    mixing, _ = np.linalg.qr(rng.normal(size=(width, width)))  # (F, F) orthogonal
    prototypes = rng.normal(size=(num_classes, signal_dims))  # (C, S)
    classes = np.repeat(np.arange(num_classes), samples_per_class)
    signal = prototypes[classes] + signal_std * rng.normal(size=(len(classes), signal_dims))
    noise = noise_std * rng.normal(size=(len(classes), noise_dims))
    features = np.concatenate([signal, noise], axis=1) @ mixing.T  # (C * per_class, F)
    return SyntheticFewShotSet(
        features.astype(np.float32), classes.astype(np.int64), mixing[:, :signal_dims]
    )


def check_episodes(n_way: int, k_shot: int, n_query: int, class_sizes: Sequence[int],
                   split: str = "") -> None:  # fmt: skip
    """ValueError naming the key unless N-way K-shot episodes with Q queries can be drawn from
    classes of `class_sizes` examples (those of `split`, where given)."""
    if min(n_way, k_shot, n_query) < 1:
        raise ValueError(
            f"data.n_way={n_way}, data.k_shot={k_shot}, data.n_query={n_query} must be >= 1"
        )
    if n_way < 2:  # (one class: nothing to tell apart; torchmetrics' accuracy refuses it)
        raise ValueError(f"data.n_way={n_way} must be >= 2: an episode tells classes apart")
    where = f" of the {split} split" if split else ""
    if n_way > len(class_sizes):
        raise ValueError(f"data.n_way={n_way} exceeds the {len(class_sizes)} classes{where}")
    if k_shot + n_query > min(class_sizes):
        raise ValueError(
            f"data.k_shot={k_shot} + data.n_query={n_query} exceeds the {min(class_sizes)} "
            f"examples of the smallest class{where}"
        )


def split_class_sizes(source: Source, num_classes: int, samples_per_class: int
                      ) -> dict[str, list[int]]:  # fmt: skip
    """Examples per class of each split, as `FewShotDataModule.setup` builds them (the
    synthetic options count only for `synthetic`): what its episodes are checked against
    before any data is built."""
    if source == "synthetic":
        bounds = synthetic_split_bounds(num_classes)
        return {split: [samples_per_class] * (hi - lo) for split, (lo, hi) in bounds.items()}
    per_digit = np.bincount(load_digit_arrays()[1], minlength=NUM_DIGITS)
    return {split: [int(per_digit[d]) for d in digits] * NUM_ROTATIONS
            for split, digits in ROTATED_DIGIT_SPLITS.items()}  # fmt: skip


class EpisodeSampler:
    """Plans episodes over a pool of examples; episode `index` is a pure function of the seed.

    Args:
        classes: (n,) class id of every pool example.
        n_way: classes per episode (N).
        k_shot: support examples per class (K).
        n_query: query examples per class (Q).
        seed: seed; with `stream`, makes episode `index` reproducible in isolation.
        stream: distinguishes samplers sharing a seed (e.g. the train/val/test splits).

    Raises:
        ValueError: when the pool has fewer than N classes or a class has fewer than K + Q
            examples.
    """

    def __init__(
        self,
        classes: np.ndarray,
        n_way: int,
        k_shot: int,
        n_query: int,
        seed: int = 0,
        stream: int = 0,
    ) -> None:
        self.class_ids = np.unique(classes)
        self.members = [np.flatnonzero(classes == c) for c in self.class_ids]
        check_episodes(n_way, k_shot, n_query, [len(m) for m in self.members])
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.seed, self.stream = seed, stream

    def episode(self, index: int) -> dict[str, np.ndarray]:
        """Pool indices and episode labels of episode `index` (keys as the episode batch)."""
        rng = np.random.default_rng([self.seed, self.stream, index])
        # choice without replacement returns the classes in random order; label i <-> chosen[i]
        chosen = rng.choice(len(self.class_ids), self.n_way, replace=False)  # (N,)
        picks = np.stack(
            [rng.choice(self.members[c], self.k_shot + self.n_query, replace=False) for c in chosen]
        )  # (N, K + Q) distinct within a class, and classes never share examples
        labels = np.arange(self.n_way)
        order = rng.permutation(self.n_way * self.n_query)
        return {
            "support": picks[:, : self.k_shot].reshape(-1),
            "support_labels": np.repeat(labels, self.k_shot),
            "query": picks[:, self.k_shot :].reshape(-1)[order],
            "query_labels": np.repeat(labels, self.n_query)[order],
            "classes": self.class_ids[chosen],
        }


class EpisodeDataset(Dataset):
    """Episode `i` of a sampler, gathered from a pool of inputs; any index >= 0 is valid.

    The pool is gathered in numpy: torch advanced indexing of these small batches is ~20x
    slower when intra-op threads compete for a busy CPU.

    Args:
        inputs: (n, F) float32 or (n, T) int64 pool inputs.
        sampler: plans the episodes over the pool.
        num_episodes: nominal length (episodes per epoch or per evaluation).
    """

    def __init__(self, inputs: np.ndarray, sampler: EpisodeSampler, num_episodes: int) -> None:
        self.inputs = inputs
        self.sampler = sampler
        self.num_episodes = num_episodes

    def __len__(self) -> int:
        return self.num_episodes

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        plan = self.sampler.episode(index)
        plan["support"] = self.inputs[plan["support"]]  # (N*K, ...)
        plan["query"] = self.inputs[plan["query"]]  # (N*Q, ...)
        return {k: torch.from_numpy(v) for k, v in plan.items()}


class EpochEpisodeSampler(EpochSampler):
    """Episode ids `epoch · n … epoch · n + n − 1`, so each epoch sees new episodes
    (`EpochSampler`: a run resumed mid-epoch continues with the episode it stopped at, and DDP
    processes share them). With `epoch` None (no trainer) it counts its own passes instead."""

    def __init__(self, num_episodes: int, epoch: int | None = None, skip: int = 0,
                 rank: int = 0, world: int = 1) -> None:  # fmt: skip
        super().__init__(num_episodes, skip, epoch or 0, rank, world)
        self.count_passes = epoch is None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.arange(epoch * self.size, (epoch + 1) * self.size)

    def __iter__(self) -> Iterator[int]:
        order = super().__iter__()
        if self.count_passes:
            self.epoch += 1
        return order


def rotated_digit_pools(input_format: InputFormat) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{split: (inputs, class ids)}` of the rotated-digits few-shot set, split by digit."""
    images, digits = rotated_digits(*load_digit_arrays())
    inputs = encode_images(images, input_format)
    pools = {}
    for split, split_digits in ROTATED_DIGIT_SPLITS.items():
        keep = np.isin(digits % NUM_DIGITS, list(split_digits))  # digit of class r * 10 + d
        pools[split] = (inputs[keep], digits[keep])
    return pools


def synthetic_split_bounds(num_classes: int) -> dict[str, tuple[int, int]]:
    """`{split: (first class, end)}`: the first 60% of classes train, 20% val, 20% test."""
    train, val = round(0.6 * num_classes), round(0.2 * num_classes)
    return {"train": (0, train), "val": (train, train + val), "test": (train + val, num_classes)}


def synthetic_pools(data: SyntheticFewShotSet) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{split: (features, class ids)}` of `synthetic_split_bounds`."""
    pools = {}
    for split, (lo, hi) in synthetic_split_bounds(int(data.classes.max()) + 1).items():
        keep = (data.classes >= lo) & (data.classes < hi)
        pools[split] = (data.features[keep], data.classes[keep])
    return pools


class FewShotDataModule(L.LightningDataModule):
    """Episodic N-way K-shot batches over class-disjoint train/val/test splits.

    Args:
        source: `rotated_digits` or `synthetic` (module docstring).
        n_way: classes per episode (N); `spec.num_classes`.
        k_shot: support examples per class (K).
        n_query: query examples per class (Q).
        episodes_per_epoch: training episodes per epoch (new ones every epoch).
        val_episodes: fixed validation episodes.
        test_episodes: fixed test episodes.
        input_format: `features` or `tokens` (`tokens` only for rotated_digits).
        seed: seed of the episodes and of the synthetic set.
        num_workers: DataLoader worker processes.
        num_classes: synthetic only: classes in the set.
        samples_per_class: synthetic only: examples per class.
        signal_dims: synthetic only: dims of the class-signal subspace.
        noise_dims: synthetic only: irrelevant noise dims.
        signal_std: synthetic only: within-class spread in the signal subspace.
        noise_std: synthetic only: std of the noise dims.
    """

    def __init__(
        self,
        source: Source = "rotated_digits",
        n_way: int = 5,
        k_shot: int = 1,
        n_query: int = 15,
        episodes_per_epoch: int = 100,
        val_episodes: int = 100,
        test_episodes: int = 600,
        input_format: InputFormat = "features",
        seed: int = 0,
        num_workers: int = 0,
        num_classes: int = 200,
        samples_per_class: int = 60,
        signal_dims: int = 8,
        noise_dims: int = 56,
        signal_std: float = 0.55,
        noise_std: float = 1.5,
    ) -> None:
        super().__init__()
        check_input_format(input_format)
        if source not in ("rotated_digits", "synthetic"):
            raise ValueError(f"data.source={source!r} must be 'rotated_digits' or 'synthetic'")
        if source == "synthetic" and input_format != "features":
            raise ValueError("data.input_format='tokens' needs data.source='rotated_digits'")
        if min(episodes_per_epoch, val_episodes, test_episodes) < 1:
            raise ValueError(
                f"data.episodes_per_epoch={episodes_per_epoch}, data.val_episodes={val_episodes}"
                f" and data.test_episodes={test_episodes} must be >= 1"
            )
        if source == "synthetic":
            check_synthetic(signal_dims, noise_dims, signal_std, noise_std)
        for split, sizes in split_class_sizes(source, num_classes, samples_per_class).items():
            check_episodes(n_way, k_shot, n_query, sizes, split)
        self.source: Source = source
        self.n_way, self.k_shot, self.n_query = n_way, k_shot, n_query
        self.episodes = {"train": episodes_per_epoch, "val": val_episodes, "test": test_episodes}
        self.input_format: InputFormat = input_format
        self.seed = seed
        self.num_workers = num_workers
        self.synthetic = {
            "num_classes": num_classes,
            "samples_per_class": samples_per_class,
            "signal_dims": signal_dims,
            "noise_dims": noise_dims,
            "signal_std": signal_std,
            "noise_std": noise_std,
        }
        shape = (
            {"num_features": signal_dims + noise_dims}
            if source == "synthetic"
            else input_shape_fields(input_format)
        )
        self.spec = DataSpec(
            kind="classification",
            num_classes=n_way,
            task_names=(source,),
            extras={
                "n_way": n_way,
                "k_shot": k_shot,
                "n_query": n_query,
                "source": source,
                "input_format": input_format,
            },
            **shape,
        )
        self.data: dict[str, datasets.Dataset] = {}
        self.samplers: dict[str, EpisodeSampler] = {}
        self.signal_basis: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build the class-disjoint pools and their episode samplers once (idempotent)."""
        if self.data:
            return
        if self.source == "synthetic":
            synthetic = synthetic_fewshot(**self.synthetic, seed=self.seed)
            self.signal_basis = synthetic.signal_basis
            pools = synthetic_pools(synthetic)
        else:
            pools = rotated_digit_pools(self.input_format)
        for stream, split in enumerate(SPLITS):
            inputs, classes = pools[split]
            self.data[split] = make_dataset({"inputs": inputs, "classes": classes})
            self.samplers[split] = EpisodeSampler(
                classes, self.n_way, self.k_shot, self.n_query, self.seed, stream
            )

    def episode_dataset(self, split: str) -> EpisodeDataset:
        """The episodes of `split` (`train`, `val` or `test`) as a map-style dataset."""
        inputs = self.data[split].with_format("numpy")[:]["inputs"]  # the whole pool
        return EpisodeDataset(inputs, self.samplers[split], self.episodes[split])

    def _loader(self, split: str, sampler: Sampler[int] | None = None) -> DataLoader:
        return data_loader(
            self.episode_dataset(split),
            self.seed,
            batch_size=None,  # one episode per batch, not collated
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        episodes, trainer = self.episodes["train"], self.trainer
        if trainer is None:
            return self._loader("train", EpochEpisodeSampler(episodes))
        skip = samples_done_this_epoch(trainer, 1)  # an episode a batch
        sampler = EpochEpisodeSampler(episodes, trainer.current_epoch, skip, **shard(trainer))
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", eval_sampler(self.episodes["val"], self.trainer))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", eval_sampler(self.episodes["test"], self.trainer))
