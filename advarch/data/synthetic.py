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

from abc import abstractmethod

import datasets
import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from advarch.data.digits import make_dataset, make_loader
from advarch.spec import DataSpec

IGNORE = -100
BLANK, MARKER = 0, 1  # selective copying: noise token, "copy now" token; data ids 2..V-1
PAD, BOS = 0, 1  # reversal: padding and target start; data ids 2..V-1
SPLITS = ("train", "val", "test")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _random_subsets(rng: np.random.Generator, rows: int, population: int, size: int) -> np.ndarray:
    """(rows, size) distinct indices in [0, population) per row, in random order."""
    return rng.random((rows, population)).argsort(axis=1)[:, :size]


class SyntheticSequenceDataModule(L.LightningDataModule):
    """Shared plumbing: seeded generation of train/val/test and plain DataLoaders.

    Args:
        num_train: training examples.
        num_val: validation examples.
        num_test: test examples.
        seed: seed of every random draw.
        batch_size: examples per batch.
        num_workers: DataLoader workers (0 = main process).
    """

    def __init__(
        self, *, num_train: int, num_val: int, num_test: int, seed: int, batch_size: int,
        num_workers: int,
    ) -> None:  # fmt: skip
        super().__init__()
        for key, value in (("num_train", num_train), ("num_val", num_val),
                           ("num_test", num_test), ("batch_size", batch_size)):  # fmt: skip
            _check(value >= 1, f"data.{key}={value} must be >= 1")
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.splits: dict[str, datasets.Dataset] = {}

    @property
    @abstractmethod
    def spec(self) -> DataSpec:
        """What the model builder needs to know; available right after construction."""

    @abstractmethod
    def generate(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`num` examples as int64 numpy columns named like the batch keys."""

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        children = np.random.SeedSequence(self.seed).spawn(len(SPLITS))
        for split, child in zip(SPLITS, children, strict=True):
            rng = np.random.default_rng(child)
            self.splits[split] = make_dataset(self.generate(self.sizes[split], rng))

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        return make_loader(self.splits[split], self.batch_size, split == "train", self.seed,
                           self.num_workers)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class SelectiveCopyingDataModule(SyntheticSequenceDataModule):
    """Selective copying: K data tokens at random context positions, then K markers.

    Token ids: 0 noise (blank), 1 marker, 2..vocab_size-1 data. An input is
    `seq_len - K` context tokens (noise except K data tokens at sorted random positions)
    followed by K markers; `labels` holds the K data tokens, in order, at the marker positions.
    """

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
    ) -> None:
        super().__init__(num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                         batch_size=batch_size, num_workers=num_workers)  # fmt: skip
        _check(vocab_size >= 3, f"data.vocab_size={vocab_size} must be >= 3 (noise, marker, data)")
        _check(
            num_tokens_to_copy >= 1, f"data.num_tokens_to_copy={num_tokens_to_copy} must be >= 1"
        )
        _check(seq_len >= 2 * num_tokens_to_copy,
               f"data.seq_len={seq_len} must be >= 2 * data.num_tokens_to_copy"
               f"={2 * num_tokens_to_copy} (context and answer)")  # fmt: skip
        self.seq_len, self.num_copy, self.vocab_size = seq_len, num_tokens_to_copy, vocab_size

    @property
    def spec(self) -> DataSpec:
        return DataSpec(kind="lm", vocab_size=self.vocab_size, seq_len=self.seq_len,
                        task_names=("selective_copying",))  # fmt: skip

    def generate(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        context, k = self.seq_len - self.num_copy, self.num_copy
        positions = np.sort(_random_subsets(rng, num, context, k), axis=1)  # (N, K)
        data = rng.integers(MARKER + 1, self.vocab_size, size=(num, k))  # (N, K)
        input_ids = np.full((num, self.seq_len), BLANK, dtype=np.int64)
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
    `labels` holds each queried key's value at the query position.
    """

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
    ) -> None:
        super().__init__(num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                         batch_size=batch_size, num_workers=num_workers)  # fmt: skip
        self.num_keys = (vocab_size - 1) // 2
        _check(1 <= num_kv_pairs <= self.num_keys,
               f"data.num_kv_pairs={num_kv_pairs} must be in [1, (data.vocab_size - 1) // 2"
               f"={self.num_keys}] (keys are distinct)")  # fmt: skip
        _check(
            1 <= num_queries <= num_kv_pairs,
            f"data.num_queries={num_queries} must be in [1, data.num_kv_pairs={num_kv_pairs}]",
        )
        _check(seq_len >= 2 * num_kv_pairs + num_queries,
               f"data.seq_len={seq_len} must be >= 2 * data.num_kv_pairs + data.num_queries"
               f"={2 * num_kv_pairs + num_queries}")  # fmt: skip
        self.seq_len, self.num_pairs, self.num_queries = seq_len, num_kv_pairs, num_queries
        self.vocab_size = vocab_size

    @property
    def spec(self) -> DataSpec:
        return DataSpec(kind="lm", vocab_size=self.vocab_size, seq_len=self.seq_len,
                        task_names=("associative_recall",))  # fmt: skip

    def generate(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        p, q = self.num_pairs, self.num_queries
        keys = _random_subsets(rng, num, self.num_keys, p) + 1  # (N, P)
        values = rng.integers(self.num_keys + 1, self.vocab_size, size=(num, p))  # (N, P)
        asked = _random_subsets(rng, num, p, q)  # (N, Q) which pairs are queried, in order
        slots = 2 * p + np.sort(_random_subsets(rng, num, self.seq_len - 2 * p, q), axis=1)
        input_ids = np.full((num, self.seq_len), BLANK, dtype=np.int64)
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
    """

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
    ) -> None:
        super().__init__(num_train=num_train, num_val=num_val, num_test=num_test, seed=seed,
                         batch_size=batch_size, num_workers=num_workers)  # fmt: skip
        _check(vocab_size >= 3, f"data.vocab_size={vocab_size} must be >= 3 (pad, bos, data)")
        _check(seq_len >= 1, f"data.seq_len={seq_len} must be >= 1")
        self.seq_len, self.vocab_size = seq_len, vocab_size

    @property
    def spec(self) -> DataSpec:
        return DataSpec(kind="seq2seq", vocab_size=self.vocab_size, seq_len=self.seq_len,
                        target_vocab_size=self.vocab_size, target_len=self.seq_len, pad_id=PAD,
                        bos_id=BOS, task_names=("reversal",))  # fmt: skip

    def generate(self, num: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        source = rng.integers(BOS + 1, self.vocab_size, size=(num, self.seq_len))  # (N, T)
        target = source[:, ::-1].copy()
        decoder_input_ids = np.concatenate([np.full((num, 1), BOS), target[:, :-1]], axis=1)
        return {"input_ids": source, "decoder_input_ids": decoder_input_ids, "labels": target}
