"""Synthetic sequence tasks that probe sequence mixers: selective copying, associative recall,
sequence reversal.

- Selective copying (Gu & Dao 2023, Mamba §4.1.1): data tokens scattered among noise must be
  reproduced in order after the context, so a model has to select by content, not position.
- Multi-query associative recall (Arora et al. 2023, Zoology): key-value pairs, then keys queried
  again later; the answer is the value that followed the key.
- Reversal: a seq2seq task whose target is the source read backwards.

LM tasks put the target for position t in `labels[t]` (already aligned, as the text datamodule
does) and -100 everywhere except the answer positions, so token accuracy on labelled positions
is the task metric. Every split is drawn with numpy from `seed` (train, val and test from
independent child seeds) and held as an HF `datasets.Dataset` returning torch tensors.

Shapes: N examples, T sequence length, K tokens to copy, P key-value pairs, Q queries.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Mapping, Sequence

import datasets
import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from advarch.data.loaders import make_dataset, make_loader
from advarch.data.sampling import resumable_loader
from advarch.spec import DataSpec

IGNORE = -100
BLANK, MARKER = 0, 1  # selective copying: noise token, "copy now" token; data ids 2..V-1
PAD, BOS = 0, 1  # reversal: padding and target start; data ids 2..V-1
SPLITS = ("train", "val", "test")
STAGE_KEYS = ("epochs", "num_train")  # curriculum-stage keys besides the task's size

log = logging.getLogger(__name__)


def _sizes(size: dict[str, int]) -> str:
    """`seq_len=64 num_tokens_to_copy=8`: a task size as its keys are typed."""
    return " ".join(f"{k}={v}" for k, v in size.items())


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _random_subsets(rng: np.random.Generator, rows: int, population: int, size: int) -> np.ndarray:
    """(rows, size) distinct indices in [0, population) per row, in random order."""
    return rng.random((rows, population)).argsort(axis=1)[:, :size]


class SyntheticSequenceDataModule(L.LightningDataModule):
    """Shared plumbing: seeded generation of train/val/test, a warm-up curriculum, DataLoaders.

    A subclass describes its task size as `self.size` (e.g. `seq_len`, `num_tokens_to_copy`),
    checks a size with `check_size` and draws examples of any size with `generate`. A
    curriculum is a list of easier sizes trained first, one stage after another, each for
    `epochs` epochs of `num_train` freshly drawn examples; then the task itself. Validation and
    test always use the task's own size, so the metrics are those of the real task.

    Contract with the Trainer (train.py applies `trainer_overrides`): with a curriculum,
    `reload_dataloaders_every_n_epochs=1`, and `train_dataloader()` serves the stage of
    `trainer.current_epoch`, so a resumed run continues in the right stage.

    Args:
        size: the task's size arguments (those `generate` and `check_size` take).
        num_train: training examples (per epoch of every curriculum stage as well).
        num_val: validation examples.
        num_test: test examples.
        seed: seed of every random draw.
        batch_size: examples per batch.
        num_workers: DataLoader workers (0 = main process).
        curriculum: warm-up stages, each a mapping of some of `curriculum_keys` to smaller
            values plus optional `epochs` (default 1) and `num_train` (examples per epoch,
            default `num_train`); `seq_len` may not exceed the task's.
    """

    curriculum_keys: tuple[str, ...] = ()  # size arguments a curriculum stage may set

    def __init__(
        self, size: dict[str, int], *, num_train: int, num_val: int, num_test: int, seed: int,
        batch_size: int, num_workers: int, curriculum: Sequence[Mapping[str, int]] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.check_size(size, "data.")
        self.size = size
        for key, value in (("num_train", num_train), ("num_val", num_val),
                           ("num_test", num_test), ("batch_size", batch_size)):  # fmt: skip
            _check(value >= 1, f"data.{key}={value} must be >= 1")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        for i, stage in enumerate(curriculum):
            _check(isinstance(stage, Mapping) and all(isinstance(v, int) for v in stage.values()),
                   f"data.curriculum[{i}]={stage!r} must map option names to integers, e.g. "
                   "{seq_len: 64}")  # fmt: skip
        self.curriculum = [dict(stage) for stage in curriculum]
        self.splits: dict[str, datasets.Dataset] = {}
        self._stage_data: tuple[int, datasets.Dataset] | None = None  # (stage, its train set)
        self._check_curriculum()

    @property
    @abstractmethod
    def spec(self) -> DataSpec:
        """What the model builder needs to know; available right after construction."""

    @abstractmethod
    def check_size(self, size: dict[str, int], prefix: str) -> None:
        """Raise ValueError naming `{prefix}{key}` when `size` describes no valid task."""

    @abstractmethod
    def generate(
        self, num: int, rng: np.random.Generator, size: dict[str, int]
    ) -> dict[str, np.ndarray]:
        """`num` examples of task size `size` as int64 numpy columns named like the batch keys."""

    def _check_curriculum(self) -> None:
        """Every stage sets only known keys to a valid size no longer than the task."""
        allowed = (*self.curriculum_keys, *STAGE_KEYS)
        for i, stage in enumerate(self.curriculum):
            prefix = f"data.curriculum[{i}]."
            for key in stage:
                _check(key in allowed, f"{prefix}{key} is not a curriculum option "
                                       f"(options: {', '.join(allowed)})")  # fmt: skip
            for key in STAGE_KEYS:
                _check(stage.get(key, 1) >= 1, f"{prefix}{key}={stage.get(key)} must be >= 1")
            size, longest = self.stage_size(i), self.size["seq_len"]
            _check(size["seq_len"] <= longest,
                   f"{prefix}seq_len={size['seq_len']} must be <= data.seq_len"
                   f"={longest}")  # fmt: skip
            self.check_size(size, prefix)

    def stage_size(self, stage: int) -> dict[str, int]:
        """Task size of curriculum stage `stage` (the task's own values where it sets none)."""
        overrides = {k: v for k, v in self.curriculum[stage].items() if k not in STAGE_KEYS}
        return {**self.size, **overrides}

    def stage_of_epoch(self, epoch: int) -> int | None:
        """The curriculum stage trained during `epoch`, None once the task itself is trained."""
        end = 0
        for stage, spec in enumerate(self.curriculum):
            end += spec.get("epochs", 1)
            if epoch < end:
                return stage
        return None

    def _first_epoch(self, stage: int) -> int:
        """The epoch curriculum stage `stage` starts at (past the last: the task's own)."""
        return sum(spec.get("epochs", 1) for spec in self.curriculum[:stage])

    @property
    def trainer_overrides(self) -> dict[str, int]:
        """Trainer arguments this datamodule needs: a new train loader per epoch in a curriculum."""
        return {"reload_dataloaders_every_n_epochs": 1} if self.curriculum else {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        children = np.random.SeedSequence(self.seed).spawn(len(SPLITS))
        for split, child in zip(SPLITS, children, strict=True):
            rng = np.random.default_rng(child)
            self.splits[split] = make_dataset(self.generate(self.sizes[split], rng, self.size))

    def _train_set(self, epoch: int) -> datasets.Dataset:
        """The task's train split, or the current curriculum stage's (drawn once, on entry)."""
        stage = self.stage_of_epoch(epoch)
        if stage is None:
            if self._stage_data is not None:  # the warm-up is over: free its examples
                log.info("curriculum done: from epoch %d the task itself (%s, %d examples)",
                         self._first_epoch(len(self.curriculum)), _sizes(self.size),
                         self.sizes["train"])  # fmt: skip
            self._stage_data = None
            return self.splits["train"]
        if self._stage_data is None or self._stage_data[0] != stage:
            size = self.stage_size(stage)
            num = self.curriculum[stage].get("num_train", self.sizes["train"])
            first, last = self._first_epoch(stage), self._first_epoch(stage + 1) - 1
            epochs = f"epoch {first}" if first == last else f"epochs {first}-{last}"
            log.info("curriculum stage %d/%d (%s): %s, %d examples", stage + 1,
                     len(self.curriculum), epochs, _sizes(size), num)  # fmt: skip
            rng = np.random.default_rng(
                np.random.SeedSequence(self.seed, spawn_key=(len(SPLITS) + stage,))
            )
            self._stage_data = (stage, make_dataset(self.generate(num, rng, size)))
        return self._stage_data[1]

    def train_dataloader(self) -> DataLoader:
        self.setup()
        epoch = 0 if self.trainer is None else self.trainer.current_epoch
        return resumable_loader(self._train_set(epoch), self.batch_size, self.seed, self.trainer,
                                num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(
            self.splits["val"], self.batch_size, False, self.seed, self.num_workers, self.trainer
        )

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return make_loader(
            self.splits["test"], self.batch_size, False, self.seed, self.num_workers, self.trainer
        )


class SelectiveCopyingDataModule(SyntheticSequenceDataModule):
    """Selective copying: K data tokens at random context positions, then K markers.

    Token ids: 0 noise (blank), 1 marker, 2..vocab_size-1 data. An input is
    `seq_len - K` context tokens (noise except K data tokens at sorted random positions)
    followed by K markers; `labels` holds the K data tokens, in order, at the marker positions.
    Curriculum stages may set `seq_len` and `num_tokens_to_copy`.
    """

    curriculum_keys = ("seq_len", "num_tokens_to_copy")

    def __init__(
        self,
        seq_len: int = 256,
        num_tokens_to_copy: int = 16,
        vocab_size: int = 16,
        num_train: int = 10000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        curriculum: Sequence[Mapping[str, int]] = (),
    ) -> None:
        _check(vocab_size >= 3, f"data.vocab_size={vocab_size} must be >= 3 (noise, marker, data)")
        self.vocab_size = vocab_size
        size = {"seq_len": seq_len, "num_tokens_to_copy": num_tokens_to_copy}
        super().__init__(size, num_train=num_train, num_val=num_val, num_test=num_test,
                         seed=seed, batch_size=batch_size, num_workers=num_workers,
                         curriculum=curriculum)  # fmt: skip

    def check_size(self, size: dict[str, int], prefix: str) -> None:
        seq_len, k = size["seq_len"], size["num_tokens_to_copy"]
        _check(k >= 1, f"{prefix}num_tokens_to_copy={k} must be >= 1")
        _check(seq_len >= 2 * k, f"{prefix}seq_len={seq_len} must be >= 2 * num_tokens_to_copy"
                                 f"={2 * k} (context and answer)")  # fmt: skip

    @property
    def spec(self) -> DataSpec:
        return DataSpec(kind="lm", vocab_size=self.vocab_size, seq_len=self.size["seq_len"],
                        task_names=("selective_copying",))  # fmt: skip

    def generate(
        self, num: int, rng: np.random.Generator, size: dict[str, int]
    ) -> dict[str, np.ndarray]:
        seq_len, k = size["seq_len"], size["num_tokens_to_copy"]
        context = seq_len - k
        positions = np.sort(_random_subsets(rng, num, context, k), axis=1)  # (N, K)
        data = rng.integers(MARKER + 1, self.vocab_size, size=(num, k))  # (N, K)
        input_ids = np.full((num, seq_len), BLANK, dtype=np.int64)
        np.put_along_axis(input_ids, positions, data, axis=1)
        input_ids[:, context:] = MARKER
        labels = np.full_like(input_ids, IGNORE)
        labels[:, context:] = data
        return {"input_ids": input_ids, "labels": labels}


class AssociativeRecallDataModule(SyntheticSequenceDataModule):
    """Multi-query associative recall (Zoology MQAR): P key-value pairs, then Q queried keys.

    Token ids: 0 noise (blank), keys 1..(vocab_size-1)//2, values the remaining ids. An input is
    `k1 v1 k2 v2 … kP vP` (distinct keys, values drawn with replacement) followed by
    `seq_len - 2P` noise tokens of which Q random positions hold distinct queried keys;
    `labels` holds each queried key's value at the query position. Curriculum stages may set
    `seq_len`, `num_kv_pairs` and `num_queries`.
    """

    curriculum_keys = ("seq_len", "num_kv_pairs", "num_queries")

    def __init__(
        self,
        seq_len: int = 64,
        num_kv_pairs: int = 8,
        num_queries: int = 8,
        vocab_size: int = 64,
        num_train: int = 10000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        curriculum: Sequence[Mapping[str, int]] = (),
    ) -> None:
        self.vocab_size = vocab_size
        size = {"seq_len": seq_len, "num_kv_pairs": num_kv_pairs, "num_queries": num_queries}
        super().__init__(size, num_train=num_train, num_val=num_val, num_test=num_test,
                         seed=seed, batch_size=batch_size, num_workers=num_workers,
                         curriculum=curriculum)  # fmt: skip

    @property
    def num_keys(self) -> int:
        """Key ids are 1..num_keys; values take the ids above."""
        return (self.vocab_size - 1) // 2

    def check_size(self, size: dict[str, int], prefix: str) -> None:
        seq_len, p, q = size["seq_len"], size["num_kv_pairs"], size["num_queries"]
        _check(1 <= p <= self.num_keys,
               f"{prefix}num_kv_pairs={p} must be in [1, (data.vocab_size - 1) // 2"
               f"={self.num_keys}] (keys are distinct)")  # fmt: skip
        _check(1 <= q <= p, f"{prefix}num_queries={q} must be in [1, num_kv_pairs={p}]")
        _check(seq_len >= 2 * p + q, f"{prefix}seq_len={seq_len} must be >= 2 * num_kv_pairs"
                                     f" + num_queries={2 * p + q}")  # fmt: skip

    @property
    def spec(self) -> DataSpec:
        return DataSpec(kind="lm", vocab_size=self.vocab_size, seq_len=self.size["seq_len"],
                        task_names=("associative_recall",))  # fmt: skip

    def generate(
        self, num: int, rng: np.random.Generator, size: dict[str, int]
    ) -> dict[str, np.ndarray]:
        seq_len, p, q = size["seq_len"], size["num_kv_pairs"], size["num_queries"]
        keys = _random_subsets(rng, num, self.num_keys, p) + 1  # (N, P)
        values = rng.integers(self.num_keys + 1, self.vocab_size, size=(num, p))  # (N, P)
        asked = _random_subsets(rng, num, p, q)  # (N, Q) which pairs are queried, in order
        slots = 2 * p + np.sort(_random_subsets(rng, num, seq_len - 2 * p, q), axis=1)
        input_ids = np.full((num, seq_len), BLANK, dtype=np.int64)
        input_ids[:, 0 : 2 * p : 2], input_ids[:, 1 : 2 * p : 2] = keys, values
        np.put_along_axis(input_ids, slots, np.take_along_axis(keys, asked, axis=1), axis=1)
        labels = np.full_like(input_ids, IGNORE)
        np.put_along_axis(labels, slots, np.take_along_axis(values, asked, axis=1), axis=1)
        return {"input_ids": input_ids, "labels": labels}


class SequenceReversalDataModule(SyntheticSequenceDataModule):
    """Seq2seq reversal: the target is the source sequence read backwards.

    Token ids: 0 padding (never emitted: all sequences have `seq_len` tokens), 1 BOS, data
    2..vocab_size-1 (source and target share the vocabulary). `decoder_input_ids` is BOS
    followed by the target shifted right (teacher forcing); `labels` is the target.
    Curriculum stages may set `seq_len`.
    """

    curriculum_keys = ("seq_len",)

    def __init__(
        self,
        seq_len: int = 16,
        vocab_size: int = 12,
        num_train: int = 10000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        curriculum: Sequence[Mapping[str, int]] = (),
    ) -> None:
        _check(vocab_size >= 3, f"data.vocab_size={vocab_size} must be >= 3 (pad, bos, data)")
        self.vocab_size = vocab_size
        size = {"seq_len": seq_len}
        super().__init__(size, num_train=num_train, num_val=num_val, num_test=num_test,
                         seed=seed, batch_size=batch_size, num_workers=num_workers,
                         curriculum=curriculum)  # fmt: skip

    def check_size(self, size: dict[str, int], prefix: str) -> None:
        _check(size["seq_len"] >= 1, f"{prefix}seq_len={size['seq_len']} must be >= 1")

    @property
    def spec(self) -> DataSpec:
        seq_len = self.size["seq_len"]
        return DataSpec(kind="seq2seq", vocab_size=self.vocab_size, seq_len=seq_len,
                        target_vocab_size=self.vocab_size, target_len=seq_len, pad_id=PAD,
                        padded_inputs=False, bos_id=BOS, task_names=("reversal",))  # fmt: skip

    def generate(
        self, num: int, rng: np.random.Generator, size: dict[str, int]
    ) -> dict[str, np.ndarray]:
        source = rng.integers(BOS + 1, self.vocab_size, size=(num, size["seq_len"]))  # (N, T)
        target = source[:, ::-1].copy()
        decoder_input_ids = np.concatenate([np.full((num, 1), BOS), target[:, :-1]], axis=1)
        return {"input_ids": source, "decoder_input_ids": decoder_input_ids, "labels": target}
