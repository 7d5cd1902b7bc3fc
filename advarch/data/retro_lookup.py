"""Retrieval lookup: a task RETRO can solve only by retrieving (facts live in the database).

A set of F random facts `key → value` (a key is `chunk_size − 2` tokens, a value one token) is
written into database documents; training and held-out *query* documents ask for the values of
keys whose facts appear only in the database, never earlier in the query's own document. Every
document, database and query alike, is a run of fact chunks of `chunk_size` tokens

    [previous fact's value (START in the first chunk), key tokens…, EQ]

so a query chunk and the database chunk of the same fact share all their key n-grams, and the
value sits at the start of the *next* chunk: exactly RETRO's neighbour + continuation. Query
documents are sequences of L = seq_len // chunk_size distinct facts; `labels` hold the value at
every EQ position (the position that completes chunk u, the first one chunked cross-attention
lets see chunk u's neighbours), -100 elsewhere, so `val/acc` is answer accuracy.

Neighbours come through the real retrieval path: a `RetrievalDatabase` over the database
documents (hashed n-gram embedder, exact inner-product search), queried with every query chunk.
Validation and test ask only about held-out facts that no training query asks about, so
memorising facts in the weights cannot help: a plain decoder, or RETRO given padding neighbours,
stays at chance (1 / num_values).

Shapes: F facts, S sequences, T = seq_len, m = chunk_size, L = T // m, K neighbours, R = 2m.
"""

from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from advarch.data.chunk_embedders import HashedNgramEmbedder
from advarch.data.retrieval_database import RetrievalDatabase
from advarch.data.sampling import data_loader, eval_sampler, resumable_loader
from advarch.data.synthetic import IGNORE, SPLITS, _check, _random_subsets
from advarch.spec import DataSpec

PAD, START, EQ = 0, 1, 2  # padding (never in a query), the first chunk's "previous value", '='
FIRST_KEY = 3  # key token ids FIRST_KEY .. FIRST_KEY + num_key_tokens − 1, then the values

log = logging.getLogger(__name__)


class _LookupDataset(Dataset):
    """Rows of (input_ids, labels, neighbour ids) as tensors; neighbours gathered per batch."""

    def __init__(self, input_ids: np.ndarray, labels: np.ndarray, neighbour_ids: np.ndarray):
        self.input_ids = torch.from_numpy(input_ids)  # (S, T)
        self.labels = torch.from_numpy(labels)  # (S, T)
        self.neighbour_ids = torch.from_numpy(neighbour_ids)  # (S, L, K)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids[i], self.labels[i], self.neighbour_ids[i]


class _Collate:
    """Stack rows; neighbour chunk ids (B, L, K) → tokens (B, L, K, R) from the database."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (M + 1, R): every database chunk + continuation, then padding

    def __call__(self, rows: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        input_ids, labels, ids = (torch.stack(col) for col in zip(*rows, strict=True))
        return {"input_ids": input_ids, "labels": labels, "neighbours": self.table[ids]}


class RetroLookupDataModule(L.LightningDataModule):
    """Key → value lookups answerable only from retrieved database chunks (module docstring).

    Args:
        num_facts: facts F in the database (distinct keys).
        held_out_fraction: share of the facts asked only by validation and test queries.
        facts_per_document: facts per database document (the last value ends the document).
        num_key_tokens: key alphabet size; a key is `chunk_size − 2` tokens of it.
        num_values: value alphabet size (chance accuracy is 1 / num_values).
        seq_len: tokens per query sequence, a multiple of chunk_size (one fact per chunk).
        chunk_size: retrieval chunk m.
        num_neighbours: neighbours K per chunk.
        embedder_dim: width of the hashed n-gram embedding of the retriever.
        ngrams: token n-gram sizes the retriever counts.
        num_train: training query sequences.
        num_val: validation query sequences.
        num_test: test query sequences.
        seed: seed of every random draw.
        batch_size: sequences per batch.
        num_workers: DataLoader workers (0 = main process).
    """

    def __init__(
        self,
        num_facts: int = 4096,
        held_out_fraction: float = 0.25,
        facts_per_document: int = 16,
        num_key_tokens: int = 16,
        num_values: int = 64,
        seq_len: int = 64,
        chunk_size: int = 8,
        num_neighbours: int = 2,
        embedder_dim: int = 512,
        ngrams: tuple[int, ...] = (3, 4),
        num_train: int = 20000,
        num_val: int = 1000,
        num_test: int = 1000,
        seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check(chunk_size >= 3, f"data.chunk_size={chunk_size} must be >= 3 (value, key, EQ)")
        _check(seq_len >= chunk_size and seq_len % chunk_size == 0,
               f"data.seq_len={seq_len} must be a positive multiple of "
               f"data.chunk_size={chunk_size} (one fact per chunk)")  # fmt: skip
        _check(0 < held_out_fraction < 1,
               f"data.held_out_fraction={held_out_fraction} must be in (0, 1)")  # fmt: skip
        for key, value in (("num_key_tokens", num_key_tokens), ("num_values", num_values),
                           ("facts_per_document", facts_per_document),
                           ("num_neighbours", num_neighbours), ("num_train", num_train),
                           ("num_val", num_val), ("num_test", num_test),
                           ("batch_size", batch_size)):  # fmt: skip
            _check(value >= 1, f"data.{key}={value} must be >= 1")
        self.key_len, self.num_chunks = chunk_size - 2, seq_len // chunk_size
        _check(num_key_tokens**self.key_len >= 2 * num_facts,
               f"data.num_facts={num_facts} needs more distinct keys: raise "
               f"data.num_key_tokens={num_key_tokens} or data.chunk_size")  # fmt: skip
        held_out = round(num_facts * held_out_fraction)
        for name, pool in (("held-out", held_out), ("training", num_facts - held_out)):
            _check(pool >= self.num_chunks,
                   f"data.num_facts={num_facts} leaves {pool} {name} facts, fewer than the "
                   f"{self.num_chunks} distinct facts a sequence asks for")  # fmt: skip
        self.num_facts, self.num_held_out = num_facts, held_out
        self.facts_per_document = facts_per_document
        self.num_key_tokens, self.num_values = num_key_tokens, num_values
        self.seq_len, self.chunk_size, self.num_neighbours = seq_len, chunk_size, num_neighbours
        self.embedder_dim, self.ngrams = embedder_dim, tuple(int(g) for g in ngrams)
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.db: RetrievalDatabase | None = None
        self.splits: dict[str, _LookupDataset] = {}
        self.retrieval_hit: dict[str, float] = {}

    @property
    def vocab_size(self) -> int:
        return FIRST_KEY + self.num_key_tokens + self.num_values

    @property
    def spec(self) -> DataSpec:
        m = self.chunk_size
        return DataSpec(kind="lm", vocab_size=self.vocab_size, seq_len=self.seq_len, pad_id=PAD,
                        padded_inputs=False, retrieval_neighbours=self.num_neighbours,
                        retrieval_chunk=m, retrieval_neighbour_len=2 * m,
                        task_names=("retro_lookup",))  # fmt: skip

    # -- data -----------------------------------------------------------------------------
    def _facts(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Distinct keys (F, m − 2) and their values (F,)."""
        keys: np.ndarray = np.zeros((0, self.key_len), dtype=np.int64)
        while len(keys) < self.num_facts:  # draw, drop duplicates, top up
            more = rng.integers(0, self.num_key_tokens, (self.num_facts, self.key_len))
            keys = np.unique(np.concatenate([keys, more]), axis=0)
        keys = rng.permutation(keys)[: self.num_facts] + FIRST_KEY
        first_value = FIRST_KEY + self.num_key_tokens
        return keys, rng.integers(first_value, first_value + self.num_values, self.num_facts)

    def _documents(self, keys: np.ndarray, values: np.ndarray, facts: np.ndarray) -> np.ndarray:
        """Documents (S, n·m) of the facts (S, n): chunk u = [value of u − 1 or START, key, EQ]."""
        s, n = facts.shape
        prev = np.concatenate([np.full((s, 1), START), values[facts[:, :-1]]], 1)  # (S, n)
        eq = np.full((s, n, 1), EQ)
        return np.concatenate([prev[..., None], keys[facts], eq], -1).reshape(s, -1)

    def _database(self, keys: np.ndarray, values: np.ndarray, rng: np.random.Generator) -> None:
        """Every fact in a database document: shuffled, `facts_per_document` per document, each
        document ending with its last fact's value (so that fact has a continuation)."""
        order = rng.permutation(self.num_facts)
        tokens, doc_ids = [], []
        for d, start in enumerate(range(0, self.num_facts, self.facts_per_document)):
            facts = order[start : start + self.facts_per_document]
            doc = np.append(self._documents(keys, values, facts[None])[0], values[facts[-1]])
            tokens.append(doc)
            doc_ids.append(np.full(len(doc), d))
        embedder = HashedNgramEmbedder(dim=self.embedder_dim, n=self.ngrams, pad_id=PAD)
        self.db = RetrievalDatabase(
            np.concatenate(tokens), np.concatenate(doc_ids), pad_id=PAD,
            chunk_size=self.chunk_size, num_neighbours=self.num_neighbours, embedder=embedder,
            index="flat",
        ).build()  # fmt: skip

    def _queries(
        self, split: str, keys: np.ndarray, values: np.ndarray, pool: np.ndarray,
        rng: np.random.Generator,
    ) -> _LookupDataset:  # fmt: skip
        """`sizes[split]` query documents of L distinct facts from `pool`, their neighbours."""
        n = self.sizes[split]
        facts = pool[_random_subsets(rng, n, len(pool), self.num_chunks)]  # (S, L)
        input_ids = self._documents(keys, values, facts)  # (S, T)
        labels = np.full_like(input_ids, IGNORE)
        labels[:, self.chunk_size - 1 :: self.chunk_size] = values[facts]
        ids = self.db.query_neighbour_ids(input_ids)  # (S, L, K) searched live
        found = self.db.neighbour_tokens(ids)[..., self.chunk_size]  # (S, L, K) first cont. token
        hit = (self.db.chunks[ids[..., 0], 1:-1] == keys[facts]).all(-1)  # (S, L) top-1 is it
        self.retrieval_hit[split] = float(hit.mean())
        log.info("retro_lookup %s: top-1 neighbour holds the asked fact for %.3f of queries "
                 "(a neighbour's continuation holds the value: %.3f)", split, hit.mean(),
                 (found == values[facts][..., None]).any(-1).mean())  # fmt: skip
        return _LookupDataset(input_ids, labels, ids)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        fact_rng, db_rng, *split_rngs = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(5)
        )
        keys, values = self._facts(fact_rng)
        self._database(keys, values, db_rng)
        held_out = np.arange(self.num_held_out)  # keys are in random order: any slice is random
        train_facts = np.arange(self.num_held_out, self.num_facts)
        for split, rng in zip(SPLITS, split_rngs, strict=True):
            pool = train_facts if split == "train" else held_out
            self.splits[split] = self._queries(split, keys, values, pool, rng)

    def _loader(self, split: str) -> DataLoader:
        self.setup()
        table = torch.from_numpy(self.db.neighbour_tokens(np.arange(len(self.db.chunks) + 1)))
        if split == "train":  # (seed, epoch)-ordered, resumable mid-epoch
            return resumable_loader(
                self.splits[split],
                self.batch_size,
                self.seed,
                self.trainer,
                num_workers=self.num_workers,
                collate_fn=_Collate(table),
            )
        dataset = self.splits[split]
        return data_loader(dataset, self.seed, batch_size=self.batch_size,
                           sampler=eval_sampler(len(dataset), self.trainer),
                           num_workers=self.num_workers, collate_fn=_Collate(table))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
