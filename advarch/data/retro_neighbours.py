"""RETRO neighbours for the text datamodule (Borgeaud et al. 2022, §2.3: retrieval per chunk).

Shape legend: B batch, T tokens per sequence, c chunk size, L = T // c chunks per sequence,
K neighbours per chunk, R = 2c neighbour length (retrieved chunk + its continuation).

`TextDataModule` (with `data.retrieval` set) calls `NeighbourLookup.build` once its tokenised
splits are cached. The lookup owns the `RetrievalDatabase` over the training split (built or
loaded from `<text cache>/retro/retro-<key>/`) and the neighbour tables of the validation and
test streams, precomputed once and cached beside it (`{split}-<hash>.npy`, written atomically),
so a collate function only gathers rows: training sequences read the database's own table
(which excludes every document a query chunk or its successor touches), held-out sequences
read theirs (held-out documents are not in the database, so nothing needs excluding).
"""

from __future__ import annotations

import hashlib
import logging
import typing
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advarch.atomic import save_npy_atomic
from advarch.data.chunk_embedders import (
    Embedder,
    HashedNgramEmbedder,
    MiniLMEmbedder,
    ProgressEmbedder,
)
from advarch.data.retrieval_database import RetrievalDatabase, build_or_load, check_options
from advarch.typecheck import matches, wrong_type

log = logging.getLogger(__name__)

EMBEDDERS = ("hashed", "minilm")
HELD_OUT = ("val", "test")


@dataclass(frozen=True)
class RetrievalOptions:
    """The keys a user writes under `data.retrieval` (see configs/data/text_retrieval.yaml)."""

    chunk_size: int = 64
    num_neighbours: int = 2
    embedder: str = "hashed"
    embedder_dim: int | None = None
    ngrams: tuple[int, ...] = (3, 4)
    index: str = "auto"
    nprobe: int = 16
    ef_search: int = 64
    search_margin: int = 16
    precompute: bool = True
    align: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RetrievalOptions:
        """Typed options from the YAML dict; unknown keys raise a ValueError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            options = ", ".join(sorted(known))
            raise ValueError(
                f"data.retrieval.{unknown[0]} is not an option; choose from: {options}"
            )
        hints = typing.get_type_hints(cls)
        for name, value in cfg.items():
            if not matches(value, hints[name]):
                raise ValueError(wrong_type(f"data.retrieval.{name}", value, hints[name]))
        cfg = dict(cfg)
        if "ngrams" in cfg:
            cfg["ngrams"] = tuple(cfg["ngrams"])
        opts = cls(**cfg)
        if opts.embedder not in EMBEDDERS:
            raise ValueError(
                f"data.retrieval.embedder={opts.embedder!r} is not one of: {', '.join(EMBEDDERS)}"
            )
        check_options(opts.chunk_size, opts.num_neighbours, opts.index, opts.search_margin,
                      opts.nprobe, opts.ef_search)  # fmt: skip
        if opts.embedder_dim is not None and opts.embedder_dim <= 0:
            raise ValueError(f"data.retrieval.embedder_dim={opts.embedder_dim} must be positive")
        if not opts.ngrams or min(opts.ngrams) < 1:
            raise ValueError(f"data.retrieval.ngrams={list(opts.ngrams)} must be positive n-gram "
                             "sizes")  # fmt: skip
        if opts.embedder == "minilm" and opts.embedder_dim not in (None, MiniLMEmbedder.dim):
            raise ValueError(
                f"data.retrieval.embedder_dim={opts.embedder_dim} does not fit "
                f"data.retrieval.embedder=minilm (fixed width {MiniLMEmbedder.dim}; use null)"
            )
        if opts.embedder == "minilm" and not MiniLMEmbedder.installed():
            raise ValueError(MiniLMEmbedder.MISSING)
        return opts

    def make_embedder(self, pad_id: int, decode: Callable[[Sequence[int]], str]) -> Embedder:
        if self.embedder == "minilm":
            return MiniLMEmbedder(decode=decode, progress=False)
        return HashedNgramEmbedder(dim=self.embedder_dim or 256, n=self.ngrams, pad_id=pad_id)


def _stream_hash(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).data)
    return h.hexdigest()


class NeighbourLookup:
    """Neighbours (B, L, K, R) of packed sequences of any split, for `LMCollate`.

    Attributes:
        db: the training-corpus `RetrievalDatabase`.
        tables: held-out split → (Q, K) neighbour chunk ids of its grid chunks.
        streams: held-out split → its token stream (the query chunks of `tables`).
        align: align every neighbour to its query chunk (`RetrievalDatabase.neighbour_tokens`).
        k, chunk_size, neighbour_len: K, c and R, for the DataSpec.
    """

    def __init__(self, db: RetrievalDatabase, tables: dict[str, np.ndarray],
                 streams: dict[str, np.ndarray], align: bool) -> None:  # fmt: skip
        self.db, self.tables, self.streams, self.align = db, tables, streams, align
        self.k, self.chunk_size, self.neighbour_len = (
            db.num_neighbours,
            db.chunk_size,
            db.neighbour_len,
        )

    @classmethod
    def build(cls, datamodule: Any, cache: Path, **retrieval_cfg: Any) -> NeighbourLookup:
        """Build or load the database and held-out tables under `cache/retro`.

        Args:
            datamodule: a prepared `TextDataModule` (`meta`, `seq_len`, `tokenizer`).
            cache: its tokenised-corpus folder holding `{split}_tokens.npy` / `_docs.npy`.
            **retrieval_cfg: the `data.retrieval` keys (`RetrievalOptions`).

        Raises:
            ValueError: unknown or invalid keys, or a seq_len that is not a whole number of
                chunks.
        """
        opts = RetrievalOptions.from_config(retrieval_cfg)
        if opts.chunk_size > 0 and datamodule.seq_len % opts.chunk_size:
            raise ValueError(
                f"data.seq_len={datamodule.seq_len} is not a multiple of "
                f"data.retrieval.chunk_size={opts.chunk_size}: RETRO retrieves for whole chunks"
            )
        cache = Path(cache)
        pad_id = datamodule.meta["pad_id"]
        embedder = ProgressEmbedder(opts.make_embedder(pad_id, datamodule.tokenizer.decode))

        def building(db: RetrievalDatabase) -> AbstractContextManager[None]:
            total = len(db.chunks) + db.num_query_chunks * db.precompute
            return embedder.progress(total, "retro: build database")

        db = build_or_load(
            cache / "retro",
            *_split_arrays(cache, "train"),
            building=building,
            pad_id=pad_id,
            chunk_size=opts.chunk_size,
            num_neighbours=opts.num_neighbours,
            embedder=embedder,
            index=opts.index,
            nprobe=opts.nprobe,
            ef_search=opts.ef_search,
            search_margin=opts.search_margin,
            precompute=opts.precompute,
        )
        folder = db.folder
        assert folder is not None  # build_or_load saved or loaded it
        tables = {split: _held_out_table(db, embedder, folder, cache, split) for split in HELD_OUT}
        log.info(
            "retrieval: %d database chunks (%s), K=%d, chunk %d, %s; %s",
            len(db.chunks),
            db.resolved_index_kind,
            db.num_neighbours,
            db.chunk_size,
            db.built or "from the cache",
            folder,
        )
        streams = {split: _split_arrays(cache, split)[0] for split in HELD_OUT}
        return cls(db, tables, streams, align=opts.align)

    def neighbours(self, split: str, starts: torch.Tensor, T: int) -> torch.Tensor:
        """Neighbours of sequences stream[s : s + T] of `split`: starts (B,) -> (B, L, K, R)."""
        starts_np = np.asarray(starts.cpu() if torch.is_tensor(starts) else starts, np.int64)
        if split == "train":
            ids, stream = self.db.sequence_neighbour_ids(starts_np, T), self.db.tokens
        elif split in self.tables:
            ids, stream = self.db.table_ids(self.tables[split], starts_np, T), self.streams[split]
        else:
            raise ValueError(f"retrieval: no neighbours for split {split!r}")
        queries = None
        if self.align:  # (B, L, c): the query chunk of each row of ids
            queries = stream[starts_np[:, None] + np.arange(T)].reshape(*ids.shape[:2], -1)
        return torch.from_numpy(self.db.neighbour_tokens(ids, queries))

    def query_neighbours(self, tokens: np.ndarray) -> torch.Tensor:
        """Neighbours of new text (generation): tokens (S, T) -> (S, L, K, R), searched live."""
        return self.db.query_neighbours(tokens, align=self.align)


def _split_arrays(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return np.load(cache / f"{split}_tokens.npy"), np.load(cache / f"{split}_docs.npy")


def _held_out_table(
    db: RetrievalDatabase, embedder: ProgressEmbedder, folder: Path, cache: Path, split: str
) -> np.ndarray:
    """The split's (Q, K) neighbour ids, from `folder` or computed and saved atomically."""
    tokens, docs = _split_arrays(cache, split)
    path = folder / f"{split}-{_stream_hash(tokens, docs)}.npy"
    if path.exists():
        return np.load(path)
    with embedder.progress(len(tokens) // db.chunk_size, f"retro: {split} neighbours"):
        table = db.stream_table(tokens, docs)
    save_npy_atomic(table, path)
    return table
