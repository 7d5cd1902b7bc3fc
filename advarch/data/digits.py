"""Digits datamodules: plain 10-class digits and continual-learning streams over them.

All data is scikit-learn's bundled 8x8 digits (1,797 images, intensities 0..16; no download).
One fixed-seed stratified 60/20/20 train/val/test split of the images (`split_seed`) is shared
by every datamodule here, so runs on different streams are comparable; permutations and
rotations are applied on top of it.

Continual scenarios follow van de Ven & Tolias 2019, "Three scenarios for continual learning":

- `task`   (task-incremental): task id given at test; labels within-task 0..c-1; the model uses
  one head (or output mask) of c classes per task.
- `domain` (domain-incremental): no task id at test; labels within-task 0..c-1; one head of c.
- `class`  (class-incremental): no task id; global labels `task * c + within` in 0..T*c-1;
  one head of all T*c classes.

Every batch carries `task`; the strategy reads `spec.extras["scenario"]` to decide whether to
use it.

Inputs (`input_format`): `features` -> (B, F=64) float in [0, 1] (intensity / 16);
`tokens` -> (B, T=64) long pixel tokens, vocabulary 17 (intensities 0..16), row-major.

Shapes: B batch, F features (64), T tokens (64), N images.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import datasets
import lightning as L
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader

from advarch.data.loaders import make_dataset, make_loader
from advarch.data.sampling import resumable_loader
from advarch.data.stream import TaskStreamMixin
from advarch.spec import DataSpec, TaskSchedule

InputFormat = Literal["features", "tokens"]
Scenario = Literal["task", "domain", "class"]
SCENARIOS = ("task", "domain", "class")
NUM_DIGITS = 10
NUM_PIXELS = 64
NUM_LEVELS = 17  # pixel intensities 0..16 -> token vocabulary
NUM_ROTATIONS = 4


@lru_cache(maxsize=1)
def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as `(images (N, 8, 8) int64 in 0..16, digits (N,) int64)`."""
    bunch = load_digits()
    return bunch.images.astype(np.int64), bunch.target.astype(np.int64)


def stratified_split(
    labels: np.ndarray, seed: int = 0, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
) -> dict[str, np.ndarray]:
    """Disjoint index arrays `{train, val, test}` stratified by label, reproducible from `seed`."""
    index = np.arange(len(labels))
    train, rest = train_test_split(
        index, train_size=fractions[0], stratify=labels, random_state=seed
    )
    val_share = fractions[1] / (fractions[1] + fractions[2])
    val, test = train_test_split(
        rest, train_size=val_share, stratify=labels[rest], random_state=seed
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digit_splits(split_seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The shared image split: `{split: (images (N, 8, 8), digits (N,))}`."""
    images, digits = load_digit_arrays()
    return {k: (images[i], digits[i]) for k, i in stratified_split(digits, split_seed).items()}


def encode_images(images: np.ndarray, input_format: InputFormat) -> np.ndarray:
    """Flatten (N, 8, 8) images row-major to float features in [0, 1] or int64 tokens."""
    flat = images.reshape(len(images), NUM_PIXELS)  # (N, 64)
    if input_format == "features":
        return (flat / (NUM_LEVELS - 1)).astype(np.float32)
    return flat.astype(np.int64)


def rotate_images(images: np.ndarray, rotation: int) -> np.ndarray:
    """Rotate (N, 8, 8) images counter-clockwise by `rotation` * 90 degrees (np.rot90)."""
    return np.rot90(images, k=rotation, axes=(1, 2)).copy()


def rotated_class(digit: np.ndarray | int, rotation: np.ndarray | int) -> np.ndarray | int:
    """Class id of a digit under a rotation: `rotation * 10 + digit` (40 classes).

    Rotation-major, so class id equals the class-incremental global label of the rotated
    stream (task = rotation, within-task label = digit).
    """
    return rotation * NUM_DIGITS + digit


def rotated_digits(images: np.ndarray, digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All four rotations of every image: `(images (4N, 8, 8), class ids (4N,))`."""
    rotated = [rotate_images(images, r) for r in range(NUM_ROTATIONS)]
    classes = [rotated_class(digits, r) for r in range(NUM_ROTATIONS)]
    return np.concatenate(rotated), np.concatenate(classes)


def check_input_format(input_format: str) -> None:
    """Raise a `ValueError` naming `data.input_format` unless it is features or tokens."""
    if input_format not in ("features", "tokens"):
        raise ValueError(f"data.input_format={input_format!r} must be 'features' or 'tokens'")


def input_shape_fields(input_format: InputFormat) -> dict[str, int]:
    """DataSpec fields describing the inputs of an 8x8 digit in `input_format`."""
    if input_format == "features":
        return {"num_features": NUM_PIXELS}
    return {"vocab_size": NUM_LEVELS, "seq_len": NUM_PIXELS}


def labelled_dataset(
    images: np.ndarray, labels: np.ndarray, task: int, input_format: InputFormat
) -> datasets.Dataset:
    """A classification dataset with columns `inputs`, `labels`, `task` (all rows `task`)."""
    return make_dataset(
        {
            "inputs": encode_images(images, input_format),
            "labels": labels.astype(np.int64),
            "task": np.full(len(labels), task, dtype=np.int64),
        }
    )


class _DigitsBase(L.LightningDataModule):
    """Shared keys and loaders of the digits datamodules.

    Args:
        batch_size: examples per batch.
        input_format: `features` (64 floats in [0, 1]) or `tokens` (64 tokens, vocab 17).
        seed: seed of everything random a subclass draws (permutations, shuffling).
        split_seed: seed of the shared stratified 60/20/20 image split.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        batch_size: int = 64,
        input_format: InputFormat = "features",
        seed: int = 0,
        split_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_input_format(input_format)
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be >= 1")
        self.batch_size = batch_size
        self.input_format: InputFormat = input_format
        self.seed = seed
        self.split_seed = split_seed
        self.num_workers = num_workers

    def _loader(self, dataset: datasets.Dataset) -> DataLoader:
        """An evaluation DataLoader over `dataset`, in order."""
        return make_loader(
            dataset, self.batch_size, False, self.seed, self.num_workers, self.trainer
        )


class DigitsDataModule(_DigitsBase):
    """Plain 10-class digits, optionally restricted to a subset of classes.

    A subset keeps the ORIGINAL labels 0..9 and `spec.num_classes` stays 10, so a head trained
    on digits {0..4} and one trained on {5..9} have the same shape (finetuning, merging).

    Args:
        classes: digits to keep, e.g. `[0, 1, 2, 3, 4]`; None keeps all ten.
        **kwargs: see `_DigitsBase` (batch_size, input_format, seed, split_seed, num_workers).
    """

    def __init__(self, classes: Sequence[int] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if classes is not None:
            bad = sorted(set(classes) - set(range(NUM_DIGITS)))
            if bad or not classes:
                raise ValueError(f"data.classes={list(classes)} must be a non-empty subset of 0..9")
        self.classes = None if classes is None else sorted(set(classes))
        self.spec = DataSpec(
            kind="classification",
            num_classes=NUM_DIGITS,
            task_names=("digits",),
            extras={"classes": self.classes, "input_format": self.input_format},
            **input_shape_fields(self.input_format),
        )
        self.data: dict[str, datasets.Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits once (idempotent)."""
        if self.data:
            return
        for split, (images, digits) in digit_splits(self.split_seed).items():
            keep = np.isin(digits, self.classes or range(NUM_DIGITS))
            self.data[split] = labelled_dataset(images[keep], digits[keep], 0, self.input_format)

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self.data["train"], self.batch_size, self.seed, self.trainer,
                                num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.data["val"])

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.data["test"])


class ContinualDataModule(TaskStreamMixin, _DigitsBase):
    """A stream of digit tasks trained one after another inside ONE `trainer.fit`.

    The stream contract (Trainer overrides, the task of each epoch from `self.schedule`, a
    resumable training loader, one evaluation loader per task) is
    `advarch.data.stream.TaskStreamMixin`; the per-task loaders let the strategy fill the accuracy
    matrix R[i, j] = accuracy on task j after training task i.

    Labels follow `scenario` (module docstring); `spec.num_classes` is classes per task for
    `task`/`domain` and `num_tasks * classes_per_task` for `class`; `spec.task_names` always
    has one name per task; `spec.extras` holds `scenario`, `classes_per_task`,
    `epochs_per_task`, `input_format`.

    Subclasses define `classes_per_task`, `max_tasks` (None = unbounded), `task_names` and
    `_task_images`; every stream supports all three scenarios.

    Args:
        num_tasks: tasks in the stream.
        epochs_per_task: training epochs spent on each task.
        scenario: `task`, `domain` or `class`.
        **kwargs: see `_DigitsBase`.
    """

    classes_per_task: int = NUM_DIGITS
    max_tasks: int | None = None

    def __init__(
        self, num_tasks: int, epochs_per_task: int = 1, scenario: Scenario = "domain", **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if num_tasks < 1 or num_tasks > (self.max_tasks or num_tasks):
            raise ValueError(f"data.num_tasks={num_tasks} must be in 1..{self.max_tasks or 'inf'}")
        if epochs_per_task < 1:
            raise ValueError(f"data.epochs_per_task={epochs_per_task} must be >= 1")
        if scenario not in SCENARIOS:
            raise ValueError(f"data.scenario={scenario!r} must be one of {list(SCENARIOS)}")
        self.num_tasks = num_tasks
        self.epochs_per_task = epochs_per_task
        self.schedule = TaskSchedule(num_tasks, epochs_per_task)
        self.scenario: Scenario = scenario
        total = self.classes_per_task * (num_tasks if scenario == "class" else 1)
        self.spec = DataSpec(
            kind="classification",
            num_classes=total,
            task_names=self.task_names,
            extras={
                "scenario": scenario,
                "classes_per_task": self.classes_per_task,
                "epochs_per_task": epochs_per_task,
                "input_format": self.input_format,
            },
            **input_shape_fields(self.input_format),
        )
        self.data: dict[str, list[datasets.Dataset]] = {}

    @property
    @abstractmethod
    def task_names(self) -> tuple[str, ...]:
        """One name per task, e.g. `perm0`, `rot90`."""

    @abstractmethod
    def _task_images(
        self, images: np.ndarray, digits: np.ndarray, task: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Task `task`'s view of a split: `(images (n, 8, 8), within-task labels (n,))`."""

    def setup(self, stage: str | None = None) -> None:
        """Build every task of every split once (idempotent)."""
        if self.data:
            return
        for split, (images, digits) in digit_splits(self.split_seed).items():
            self.data[split] = []
            for task in range(self.num_tasks):
                task_images, within = self._task_images(images, digits, task)
                labels = (
                    within + task * self.classes_per_task if self.scenario == "class" else within
                )
                self.data[split].append(
                    labelled_dataset(task_images, labels, task, self.input_format)
                )

    def task_loader(
        self, split: str, task: int, batch_size: int, shuffle: bool, seed: int
    ) -> DataLoader:
        dataset = self.data[split][task]
        return make_loader(dataset, batch_size, shuffle, seed, self.num_workers, self.trainer)


def task_permutation(seed: int, task: int) -> np.ndarray:
    """The fixed pixel permutation (64,) of `task`, drawn from `default_rng([seed, task])`."""
    return np.random.default_rng([seed, task]).permutation(NUM_PIXELS)


class PermutedDigitsDataModule(ContinualDataModule):
    """Permuted digits: task t shows every image under a fixed pixel permutation, 10 classes.

    EVERY task is permuted, task 0 included (no identity task), so no task is privileged by
    the spatial prior of the unpermuted image. Permutation t is `task_permutation(seed, t)`.
    The natural scenario is `domain`; `task` and `class` are allowed too.

    Args:
        num_tasks: permutations in the stream.
        epochs_per_task, scenario, **kwargs: see `ContinualDataModule`.
    """

    def __init__(self, num_tasks: int = 5, **kwargs) -> None:
        super().__init__(num_tasks=num_tasks, **kwargs)
        self.permutations = [task_permutation(self.seed, t) for t in range(num_tasks)]

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(f"perm{t}" for t in range(self.num_tasks))

    def _task_images(
        self, images: np.ndarray, digits: np.ndarray, task: int
    ) -> tuple[np.ndarray, np.ndarray]:
        flat = images.reshape(len(images), NUM_PIXELS)[:, self.permutations[task]]  # (N, 64)
        return flat.reshape(images.shape), digits


class SplitDigitsDataModule(ContinualDataModule):
    """Split digits: the ten digits in consecutive groups, e.g. {0,1}, {2,3}, ..., {8,9}.

    Task t holds digits `t*c .. t*c + c - 1` with `c = 10 // num_tasks`; within-task label is
    `digit - t*c`, and the class-incremental global label is the digit itself.

    Args:
        num_tasks: number of groups; must divide 10.
        epochs_per_task, scenario, **kwargs: see `ContinualDataModule`.
    """

    def __init__(self, num_tasks: int = 5, scenario: Scenario = "task", **kwargs) -> None:
        if num_tasks < 1 or NUM_DIGITS % num_tasks:
            raise ValueError(f"data.num_tasks={num_tasks} must divide the 10 digits")
        self.classes_per_task = NUM_DIGITS // num_tasks
        super().__init__(num_tasks=num_tasks, scenario=scenario, **kwargs)

    @property
    def task_names(self) -> tuple[str, ...]:
        c = self.classes_per_task
        return tuple(
            "digits" + "".join(str(d) for d in range(t * c, (t + 1) * c))
            for t in range(self.num_tasks)
        )

    def _task_images(
        self, images: np.ndarray, digits: np.ndarray, task: int
    ) -> tuple[np.ndarray, np.ndarray]:
        first = task * self.classes_per_task
        keep = (digits >= first) & (digits < first + self.classes_per_task)
        return images[keep], digits[keep] - first


class RotatedDigitsDataModule(ContinualDataModule):
    """Rotated digits: task r shows every image rotated by r * 90 degrees, 10 classes.

    Up to 4 tasks (0, 90, 180, 270 degrees, `np.rot90` counter-clockwise on the 8x8 grid).
    Natural scenario `domain`; under `class` the global label is `rotated_class(digit, r) =
    r * 10 + digit`, the same id the 40-class few-shot set uses. Some classes are visually
    ambiguous by construction (6 at 180 degrees vs 9 at 0; 0, 1 and 8 are nearly symmetric).

    Args:
        num_tasks: rotations in the stream (1..4).
        epochs_per_task, scenario, **kwargs: see `ContinualDataModule`.
    """

    max_tasks = NUM_ROTATIONS

    def __init__(self, num_tasks: int = NUM_ROTATIONS, **kwargs) -> None:
        super().__init__(num_tasks=num_tasks, **kwargs)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(f"rot{90 * r}" for r in range(self.num_tasks))

    def _task_images(
        self, images: np.ndarray, digits: np.ndarray, task: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return rotate_images(images, task), digits
