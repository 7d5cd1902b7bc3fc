"""RETRO retrieval database (Borgeaud et al. 2022, §2.2–2.3): chunk, embed, index, neighbours.

Shape legend: N corpus tokens, c chunk size (the paper's m = 64), M database chunks, Q query
chunks, K neighbours per chunk, R = 2c neighbour length (chunk + continuation), d embedding
width, S sequences, T tokens per sequence, L = T // c chunks per sequence.

Design (the choices the issue left open):

- **Database** (what can be retrieved): each document (a run of equal `doc_ids`) is chunked on
  its own from its first token into ceil(len / c) chunks; the last partial chunk is
  right-padded with `pad_id`, so a document's tail stays retrievable. A neighbour is a chunk
  followed by the next chunk of the same document (its continuation, all `pad_id` at the
  document end): (R,) tokens. Missing neighbours (see below) are all `pad_id`.
- **Queries**: training sequences are packed from the concatenated stream, so the database
  also precomputes neighbours for the stream's grid chunks: query q = tokens[q·c:(q+1)·c]. A
  sequence starting at a multiple of c reads its neighbours from that table; other starts
  and held-out text are queried live (embed + search) with the same rule.
- **Exclusion**: a query chunk may straddle documents. Its neighbours may come from no
  document that has a token in the query chunk, the chunk after it, or the rest of its
  sequence: chunked cross-attention hands them to the chunk after it, and causal
  self-attention on to every later position (RETRO §3 drops neighbours of the training
  sequence's own document), so no neighbour leaks text the sequence predicts. The training
  table holds each grid chunk's neighbours under the first two (a chunk belongs to many
  sequences); a sequence's rows that break the third are searched again. Search asks for
  K + `search_margin` hits, drops excluded ones (vectorised), and re-searches the rows left
  short with 4× the width; a row still short once the whole database was searched is filled
  with missing neighbours (a warning says how many).
- **Cache**: `build_or_load` keys a folder by a hash of (corpus fingerprint, chunk_size,
  pad_id, embedder config, K, index settings) and stores embeddings and the neighbour table
  as `.npy` and the faiss index as `index.faiss` (each written to a temp file, then
  `os.replace`d). Loading memory-maps the neighbour table and embeddings, and the index only
  if a live query needs it (faiss maps flat codes and IVF lists from the file).
- **Scale**: `ivf` / `ivfpq` train on a sample (TRAIN_POINTS_PER_LIST per list), add in
  slices, and `ivfpq` stores d/8 bytes per chunk; the exact re-ranking reads only the
  candidate rows of the memory-mapped embeddings.

The embedders (hashed n-grams by default, MiniLM) live in `advarch/data/chunk_embedders.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import faiss
import numpy as np
import torch

from advarch.atomic import save_npy_atomic, write_atomic
from advarch.data.chunk_embedders import Embedder, HashedNgramEmbedder

log = logging.getLogger(__name__)
CACHE_FILES = ("embeddings.npy", "index.faiss", "neighbours.npy")  # besides meta.json (last)

INDEX_KINDS = ("auto", "flat", "ivf", "ivfpq", "hnsw")
FLAT_MAX_CHUNKS = 16_384  # `index=auto` searches exactly up to this many database chunks
CACHE_VERSION = 2
_QUERY_BATCH = 8192  # query chunks embedded and searched at a time (bounds peak memory)
TRAIN_POINTS_PER_LIST = 64  # IVF k-means sample: this many points per list (faiss wants >= 39)
MIN_TRAIN_POINTS = 16_384  # and at least this many (PQ's 256-centroid codebooks want ~10k)
NOT_SEARCHED = -2  # a lazily searched training table's rows before their first batch
RERANK = 4  # ivfpq: candidates per wanted hit, re-scored exactly from the stored embeddings


def check_options(chunk_size: int, num_neighbours: int, index: str, search_margin: int,
                  nprobe: int, ef_search: int) -> None:  # fmt: skip
    """A ValueError naming the `data.retrieval` key of a value no database can use (faiss
    failed on it in the first search, after the whole build)."""
    counts = {"chunk_size": chunk_size, "num_neighbours": num_neighbours, "nprobe": nprobe,
              "ef_search": ef_search}  # fmt: skip
    for key, value in counts.items():
        if value <= 0:
            raise ValueError(f"data.retrieval.{key}={value} must be positive")
    if index not in INDEX_KINDS:
        raise ValueError(f"data.retrieval.index={index!r} is not one of: {', '.join(INDEX_KINDS)}")
    if search_margin < 0:
        raise ValueError(f"data.retrieval.search_margin={search_margin} must be >= 0")


def chunk_documents(
    tokens: np.ndarray, doc_ids: np.ndarray, chunk_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks every document (run of equal doc ids) separately, padding its last chunk.

    Returns:
        chunks (M, c) int32, chunk_doc (M,) doc id of each chunk, next_chunk (M,) index of the
        continuation chunk (same document) or -1 at a document's end.
    """
    n = len(tokens)
    run_start = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]])  # (D,)
    run_len = np.diff(np.r_[run_start, n])
    per_run = -(-run_len // chunk_size)  # ceil
    first = np.cumsum(per_run) - per_run  # (D,) index of each run's first chunk
    # Scatter every token to its slot in a layout where each run fills whole chunks.
    shift = np.repeat(first * chunk_size - run_start, run_len)  # (N,) slot - position
    flat = np.full(int(per_run.sum()) * chunk_size, pad_id, dtype=np.int32)
    flat[np.arange(n) + shift] = tokens
    run_of_chunk = np.repeat(np.arange(len(run_start)), per_run)  # (M,)
    last = np.zeros(len(run_of_chunk), dtype=bool)
    last[first + per_run - 1] = True
    next_chunk = np.where(last, -1, np.arange(len(run_of_chunk)) + 1)
    return flat.reshape(-1, chunk_size), doc_ids[run_start][run_of_chunk], next_chunk


def _excluded_docs(windows: np.ndarray) -> np.ndarray:
    """Distinct ids per row of `windows` (n, w), left-aligned and padded with -1: (n, X)."""
    s = np.sort(windows, axis=1)
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    new &= s >= 0  # -1 marks "no document" (beyond the stream's end)
    rank = np.cumsum(new, axis=1) - 1
    out = np.full((len(s), max(int(new.sum(1).max(initial=0)), 1)), -1, dtype=s.dtype)
    rows = np.broadcast_to(np.arange(len(s))[:, None], s.shape)
    out[rows[new], rank[new]] = s[new]
    return out


def _fingerprint(*arrays: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        h.update(str(a.shape).encode())
        small = a.size == 0 or (a.min() >= -(2**31) and a.max() < 2**31)
        h.update(np.ascontiguousarray(a, dtype=np.int32 if small else np.int64).data)
    return h.hexdigest()


def _pq_subquantisers(d: int) -> int:
    """PQ sub-quantisers for width d: one per 8 dimensions (8-bit codes), a divisor of d."""
    return max(q for q in range(1, max(1, d // 8) + 1) if d % q == 0)


def _damaged_file(folder: Path, sizes: dict[str, int]) -> str | None:
    """Which file of a saved database is missing or not the size it was written with."""
    for name, size in sizes.items():
        path = folder / name
        now = path.stat().st_size if path.is_file() else None
        if now != size:
            return f"{name}: {'missing' if now is None else f'{now} bytes'}, {size} written"
    return None


def _read_index(path: Path) -> faiss.Index:
    """The index at `path`, memory-mapped where faiss can (flat codes, IVF lists)."""
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)


class RetrievalDatabase:
    """Chunk database over a training corpus, its faiss index and precomputed neighbours.

    Args:
        tokens: (N,) token ids of the concatenated training documents.
        doc_ids: (N,) non-negative document id of every token; documents are runs of equal ids.
        pad_id: id used to pad partial chunks, continuations and missing neighbours.
        chunk_size: tokens per chunk (c).
        num_neighbours: neighbours per chunk (K).
        embedder: an `Embedder`; default `HashedNgramEmbedder(pad_id=pad_id)`.
        index: `flat` (exact inner product), `ivf` (IVF-Flat, nlist ≈ √M), `ivfpq` (IVF with
            8-bit product-quantised codes, d/8 bytes per chunk, for millions of chunks; hits
            re-ranked exactly from the stored embeddings), `hnsw`, or `auto` (flat up to
            FLAT_MAX_CHUNKS chunks, else ivf).
        nprobe: IVF lists probed per query.
        ef_search: HNSW search breadth.
        search_margin: extra hits asked for in the first search, to survive exclusion.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_ids: np.ndarray,
        *,
        pad_id: int,
        chunk_size: int = 64,
        num_neighbours: int = 2,
        embedder: Embedder | None = None,
        index: str = "auto",
        nprobe: int = 16,
        ef_search: int = 64,
        search_margin: int = 16,
        precompute: bool = True,
    ) -> None:
        check_options(chunk_size, num_neighbours, index, search_margin, nprobe, ef_search)
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if self.tokens.ndim != 1 or self.tokens.shape != self.doc_ids.shape:
            raise ValueError(f"tokens {self.tokens.shape} and doc_ids {self.doc_ids.shape} differ")
        if len(self.tokens) == 0 or self.doc_ids.min() < 0:
            raise ValueError("data.retrieval needs a non-empty corpus with doc ids >= 0")
        self.pad_id, self.chunk_size, self.num_neighbours = pad_id, chunk_size, num_neighbours
        self.neighbour_len = 2 * chunk_size
        self.embedder = embedder if embedder is not None else HashedNgramEmbedder(pad_id=pad_id)
        self.index_kind, self.nprobe, self.ef_search = index, nprobe, ef_search
        self.search_margin, self.precompute = search_margin, precompute
        self.chunks, self.chunk_doc, self.next_chunk = chunk_documents(
            self.tokens, self.doc_ids, chunk_size, pad_id
        )
        # Row -1 of both is the "missing" neighbour: numpy's index -1 selects it.
        self._chunks_ext = np.vstack([self.chunks, np.full((1, chunk_size), pad_id, np.int32)])
        self._next_ext = np.r_[self.next_chunk, -1]
        self._prev_ext = np.full(len(self._next_ext), -1)
        self._prev_ext[self.next_chunk[self.next_chunk >= 0]] = np.flatnonzero(self.next_chunk >= 0)
        self.num_query_chunks = len(self.tokens) // chunk_size
        # where each run of equal doc ids starts in the stream (`_stream_docs`)
        self._run_starts = np.flatnonzero(np.r_[True, np.diff(self.doc_ids) != 0])
        self.embeddings: np.ndarray | None = None  # (M, d) float32
        # (Q, K) chunk ids, -1 = missing, NOT_SEARCHED = left for the first batch that needs it
        self.train_neighbours: np.ndarray | None = None
        self.missing = 0  # neighbour slots filled with padding while precomputing
        self._index: faiss.Index | None = None
        self._index_path: Path | None = None  # index.faiss of the cache folder it came from
        self.folder: Path | None = None  # the cache folder it was saved to or loaded from
        self.built: str | None = None  # what `build` did and how long it took (None: loaded)

    # ---- build, save, load --------------------------------------------------------------
    def cache_key(self) -> str:
        """Hash of everything the stored arrays depend on."""
        cfg = {
            "version": CACHE_VERSION,
            "corpus": _fingerprint(self.tokens, self.doc_ids),
            "chunk_size": self.chunk_size,
            "pad_id": self.pad_id,
            "num_neighbours": self.num_neighbours,
            "embedder": self.embedder.cache_key(),
            "index": [self.index_kind, self.nprobe, self.ef_search, self.search_margin],
            "precompute": self.precompute,
        }
        return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:24]

    def build(self) -> RetrievalDatabase:
        """Embeds the database chunks, builds the index and precomputes grid neighbours (or,
        with `precompute=False`, leaves each to the first batch that needs it)."""
        t0 = time.perf_counter()
        self.embeddings = self.embedder.embed(self.chunks)
        self._index = self._build_index(self.embeddings)
        t1 = time.perf_counter()
        self.built = f"embedded and indexed in {t1 - t0:.1f} s"
        if not self.precompute:
            shape = (self.num_query_chunks, self.num_neighbours)
            self.train_neighbours = np.full(shape, NOT_SEARCHED, dtype=np.int64)
            self.built += "; training neighbours searched as batches need them"
            return self
        starts = np.arange(self.num_query_chunks) * self.chunk_size
        self.train_neighbours = self._stream_neighbour_ids(starts, missing_ok=True)
        self.missing = int((self.train_neighbours < 0).sum())
        self.built += (f"; neighbours of {self.num_query_chunks} query chunks in "
                       f"{time.perf_counter() - t1:.1f} s")  # fmt: skip
        if self.missing:
            log.warning(
                "retrieval: %d of %d neighbour slots had no chunk outside the query's documents "
                "and are padding",
                self.missing,
                self.train_neighbours.size,
            )
        return self

    @property
    def resolved_index_kind(self) -> str:
        if self.index_kind != "auto":
            return self.index_kind
        return "flat" if len(self.chunks) <= FLAT_MAX_CHUNKS else "ivf"

    def _build_index(self, emb: np.ndarray) -> faiss.Index:
        """The index over emb (M, d); IVF kinds train their coarse quantiser (and PQ codebooks)
        on a random sample of TRAIN_POINTS_PER_LIST·nlist rows, so training stays cheap at any M."""
        m, d = emb.shape
        kind = self.resolved_index_kind
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = max(1, min(int(round(math.sqrt(m))), m // 39 or 1))  # faiss: >= 39 pts/list
            # "np": no polysemous training (a code reordering only Hamming pre-filtering uses,
            # which search never enables); it costs ~3 s per sub-quantiser, 99% of a build
            codes = "Flat" if kind == "ivf" else f"PQ{_pq_subquantisers(d)}np"
            index = faiss.index_factory(d, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            size = min(m, max(TRAIN_POINTS_PER_LIST * nlist, MIN_TRAIN_POINTS))
            sample = rng.choice(m, size=size, replace=False)
            index.train(np.ascontiguousarray(emb[np.sort(sample)]))
        for i in range(0, m, 65536):  # add in slices: memory-mapped embeddings stay paged out
            index.add(np.ascontiguousarray(emb[i : i + 65536]))
        self._set_search_params(index)
        return index

    def _set_search_params(self, index: faiss.Index) -> None:
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.ef_search
        elif isinstance(index, faiss.IndexIVF):
            index.nprobe = self.nprobe

    @property
    def index(self) -> faiss.Index:
        """The faiss index, read (memory-mapped) from the cache folder on first use after a load."""
        if self._index is None:
            if self._index_path is None:
                raise RuntimeError("retrieval database not built: call build() or build_or_load()")
            self._index = _read_index(self._index_path)
            self._set_search_params(self._index)
        return self._index

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the arrays atomically; meta.json goes last and marks the folder complete."""
        folder = Path(folder)
        save_npy_atomic(self.embeddings, folder / "embeddings.npy")
        write_atomic(folder / "index.faiss", lambda tmp: faiss.write_index(self.index, str(tmp)))
        save_npy_atomic(self.train_neighbours, folder / "neighbours.npy")
        meta = {"key": self.cache_key(), "index": self.resolved_index_kind}
        meta |= {"chunks": len(self.chunks), "missing": self.missing}
        meta["bytes"] = {name: (folder / name).stat().st_size for name in CACHE_FILES}
        write_atomic(folder / "meta.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=1)))
        self.folder = folder

    def load(self, folder: str | os.PathLike) -> bool:
        """Loads a folder written by `save` for this exact configuration; False if absent or
        damaged (a file not the size it was written with: it is then built again).

        Embeddings and the neighbour table are memory maps; the index is memory-mapped from
        `index.faiss` only when a live query needs it."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        if meta.get("key") != self.cache_key():
            return False
        damaged = _damaged_file(folder, meta.get("bytes", {}))
        if damaged:
            log.warning("retrieval cache %s is damaged (%s): building it again", folder, damaged)
            return False
        self.embeddings = np.load(folder / "embeddings.npy", mmap_mode="r")
        # copy-on-write when searched lazily: rows filled in this process, the file unchanged
        mode = "r" if self.precompute else "c"
        self.train_neighbours = np.load(folder / "neighbours.npy", mmap_mode=mode)
        self._index_path, self._index, self.missing = (
            folder / "index.faiss",
            None,
            int(meta["missing"]),
        )
        self.folder = folder
        return True

    def __getstate__(self) -> dict:
        """DataLoader workers get the arrays; the faiss index travels as bytes, or as its path
        when it was loaded from a cache folder (each worker memory-maps it itself)."""
        state = self.__dict__.copy()
        if state["_index"] is not None and state["_index_path"] is None:
            state["_index_bytes"] = faiss.serialize_index(state["_index"])
        state["_index"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        index_bytes = state.pop("_index_bytes", None)
        self.__dict__.update(state)
        if index_bytes is not None:
            self._index = faiss.deserialize_index(index_bytes)
            self._set_search_params(self._index)

    def _index_search(self, queries: np.ndarray, width: int) -> np.ndarray:
        """Top `width` chunk ids per query (n, width), -1 past the end; ivfpq re-ranks RERANK×
        more PQ candidates by their exact inner products with the stored embeddings."""
        if self.resolved_index_kind != "ivfpq":
            return self.index.search(queries, width)[1]
        cand = self.index.search(queries, min(len(self.chunks), RERANK * width))[1]  # (n, w')
        flat = np.unique(cand[cand >= 0])
        emb = np.asarray(self.embeddings[flat])  # (u, d) touched rows only (memory map)
        pos = np.searchsorted(flat, np.maximum(cand, 0))
        scores = np.einsum("nwd,nd->nw", emb[pos], queries)  # (n, w')
        scores[cand < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :width]
        return np.take_along_axis(cand, order, 1)

    # ---- search -------------------------------------------------------------------------
    def search(self, queries: np.ndarray, exclude: np.ndarray, missing_ok: bool = True):
        """Top-K database chunk ids per query, skipping chunks of excluded documents.

        Args:
            queries: (n, d) float32 query embeddings.
            exclude: (n, X) doc ids each query must not retrieve from; -1 entries are unused.
            missing_ok: if False, raise instead of padding rows left with fewer than K hits.

        Returns:
            (n, K) int64 chunk ids in decreasing similarity, -1 for a missing neighbour.
        """
        k, m = self.num_neighbours, len(self.chunks)
        out = np.full((len(queries), k), -1, dtype=np.int64)
        todo = np.arange(len(queries))
        width = min(m, k + self.search_margin)
        while todo.size:
            ids = self._index_search(np.ascontiguousarray(queries[todo]), width)  # (n', w)
            if width < k:
                ids = np.pad(ids, ((0, 0), (0, k - width)), constant_values=-1)
            doc = self.chunk_doc[ids]  # ids of -1 read a real doc here but are dropped below
            bad = (ids < 0) | (doc[:, :, None] == exclude[todo][:, None, :]).any(-1)
            order = np.argsort(bad, axis=1, kind="stable")[:, :k]  # good hits first, in rank
            picked = np.take_along_axis(ids, order, 1)
            short = np.take_along_axis(bad, order, 1)
            picked[short] = -1
            done = ~short.any(1) | (width >= m)
            out[todo[done]] = picked[done]
            todo, width = todo[~done], min(m, width * 4)
        if not missing_ok and (out < 0).any():
            raise ValueError(
                f"data.retrieval.num_neighbours={k}: {(out < 0).any(1).sum()} query chunks "
                "have fewer neighbours outside their own documents"
            )
        return out

    def _query_ids(self, chunks: np.ndarray, excluded: np.ndarray | None, missing_ok: bool):
        """chunks (n, c) and the doc ids each must not retrieve from (n, X), -1 padded, or
        None -> (n, K)."""
        out = np.empty((len(chunks), self.num_neighbours), dtype=np.int64)
        for i in range(0, len(chunks), _QUERY_BATCH):
            sl = slice(i, i + _QUERY_BATCH)
            emb = self.embedder.embed(chunks[sl])
            excl = excluded[sl] if excluded is not None else np.full((len(emb), 1), -1, np.int64)
            out[sl] = self.search(emb, excl, missing_ok)
        return out

    def _stream_docs(self, begin: np.ndarray, end: np.ndarray) -> np.ndarray:
        """The documents (n, X) of the training stream's tokens [begin, end) per row, -1
        padded: the runs of equal doc ids the range overlaps (few: no per-token window)."""
        first = np.searchsorted(self._run_starts, begin, side="right") - 1  # (n,)
        last = np.searchsorted(self._run_starts, np.maximum(end, begin + 1) - 1, side="right") - 1
        runs = first[:, None] + np.arange(int((last - first).max(initial=0)) + 1)  # (n, X)
        docs = self.doc_ids[self._run_starts[np.minimum(runs, len(self._run_starts) - 1)]]
        return np.where(runs <= last[:, None], docs, -1)

    def _stream_neighbour_ids(
        self,
        chunk_starts: np.ndarray,
        missing_ok: bool,
        tokens: np.ndarray | None = None,
        doc_ids: np.ndarray | None = None,
    ) -> np.ndarray:
        """Live neighbours (n, K) of the chunks starting at `chunk_starts` (n,) of a stream
        (default: the training stream); doc_ids None excludes nothing."""
        if tokens is None:
            tokens, doc_ids = self.tokens, self.doc_ids
        c, n = self.chunk_size, len(tokens)
        pos = chunk_starts[:, None] + np.arange(2 * c)  # (n, 2c): the chunk and the next one
        excluded = None
        if doc_ids is not None:
            excluded = _excluded_docs(np.where(pos < n, doc_ids[np.minimum(pos, n - 1)], -1))
        return self._query_ids(tokens[pos[:, :c]], excluded, missing_ok)

    def stream_table(self, tokens: np.ndarray, doc_ids: np.ndarray | None = None) -> np.ndarray:
        """Neighbour ids (Q, K) of every grid chunk of a held-out stream (validation/test).

        The same precomputation as the training table, for another split's concatenated
        tokens (N',); doc_ids (N',) in the training id space, or None to exclude nothing (the
        database holds only training documents). `table_ids` / `table_neighbours` read it.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        docs = None if doc_ids is None else np.asarray(doc_ids, dtype=np.int64)
        starts = np.arange(len(tokens) // self.chunk_size) * self.chunk_size
        return self._stream_neighbour_ids(starts, True, tokens, docs)

    # ---- what datamodules call ----------------------------------------------------------
    def _check_length(self, length: int) -> int:
        if length <= 0 or length % self.chunk_size:
            raise ValueError(
                f"sequence length T={length} is not a positive multiple of "
                f"data.retrieval.chunk_size={self.chunk_size}: RETRO retrieves for whole chunks"
            )
        return length // self.chunk_size

    def neighbour_tokens(self, ids: np.ndarray, queries: np.ndarray | None = None) -> np.ndarray:
        """Chunk ids (..., K) (-1 = missing) -> (..., K, R) int64 tokens: chunk + continuation.

        With ``queries`` (..., c), the query chunk each row of ids was retrieved for, every
        neighbour is aligned to its query: read from its document shifted by the offset
        δ ∈ [−c, c] at which its chunk agrees with the query chunk on the most tokens (ties: the
        smallest |δ|). A neighbour from another version of the same text then lines up token by
        token, and its continuation with the chunk that chunked cross-attention helps predict.
        """
        ids = np.asarray(ids)
        if queries is None:
            cont = self._next_ext[ids]
            tokens = np.concatenate([self._chunks_ext[ids], self._chunks_ext[cont]], -1)
            return tokens.astype(np.int64)
        c, nxt = self.chunk_size, self._next_ext
        around = (self._prev_ext[ids], ids, nxt[ids], nxt[nxt[ids]])  # 4c tokens of its document
        doc = np.concatenate([self._chunks_ext[i] for i in around], -1)  # (..., K, 4c)
        query = np.asarray(queries)[..., None, :]  # (..., 1, c)
        best, shift = np.full(ids.shape, -1), np.zeros(ids.shape, dtype=np.int64)
        for delta in sorted(range(-c, c + 1), key=abs):
            window = doc[..., c + delta : 2 * c + delta]
            agree = ((window == query) & (window != self.pad_id)).sum(-1)
            shift = np.where(agree > best, delta, shift)
            best = np.maximum(best, agree)
        index = c + shift[..., None] + np.arange(self.neighbour_len)
        return np.take_along_axis(doc, index, -1).astype(np.int64)

    def sequence_neighbour_ids(self, starts: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
        """Neighbour chunk ids of training sequences tokens[s : s + length]: (S, L, K).

        Grid-aligned starts (s % chunk_size == 0) read the precomputed table, and rows whose
        neighbours come from a document later in their sequence are searched again; other
        starts are embedded and searched now (slower). Both under the module's exclusion.
        """
        if self.train_neighbours is None:
            raise RuntimeError("retrieval database not built: call build() or build_or_load()")
        num_chunks, c = self._check_length(length), self.chunk_size
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if starts.size and (starts.min() < 0 or starts.max() + length > len(self.tokens)):
            raise ValueError(f"sequence starts must lie in [0, {len(self.tokens) - length}]")
        out = np.full((len(starts), num_chunks, self.num_neighbours), -1, dtype=np.int64)
        aligned = starts % c == 0
        out[aligned] = self._train_grid_ids(starts[aligned], num_chunks)
        ids = out.reshape(-1, self.num_neighbours)  # (S·L, K), a view
        chunk_starts = (starts[:, None] + np.arange(num_chunks) * c).reshape(-1)
        # (the sequence's last position predicts the token after it: one more)
        informed_end = np.maximum(np.repeat(starts + length + 1, num_chunks), chunk_starts + 2 * c)
        excluded = self._stream_docs(chunk_starts, np.minimum(informed_end, len(self.tokens)))
        got = np.where(ids >= 0, self.chunk_doc[ids], -1)  # (S·L, K)
        leaks = ((got[:, :, None] == excluded[:, None, :]) & (got[:, :, None] >= 0)).any((1, 2))
        redo = leaks | ~np.repeat(aligned, num_chunks)
        if redo.any():
            chunks = self.tokens[chunk_starts[redo, None] + np.arange(c)]
            ids[redo] = self._query_ids(chunks, excluded[redo], True)
        return out

    def _train_grid_ids(self, starts: np.ndarray, num_chunks: int) -> np.ndarray:
        """The training table's rows for grid-aligned starts, searching rows not searched yet."""
        grid = starts[:, None] // self.chunk_size + np.arange(num_chunks)  # (S, L)
        ids = np.asarray(self.train_neighbours[grid])  # (S, L, K)
        todo = np.unique(grid[(ids == NOT_SEARCHED).any(-1)])
        if todo.size:
            self.train_neighbours[todo] = self._stream_neighbour_ids(todo * self.chunk_size, True)
            ids = np.asarray(self.train_neighbours[grid])
        return ids

    def _grid_ids(self, table: np.ndarray, starts: np.ndarray, num_chunks: int) -> np.ndarray:
        grid = starts[:, None] // self.chunk_size + np.arange(num_chunks)  # (S, L)
        return np.asarray(table[grid])  # (S, L, K)

    def table_neighbours(
        self, table: np.ndarray, starts: Sequence[int] | np.ndarray, length: int
    ) -> torch.Tensor:
        """Neighbours (S, L, K, R) long of sequences stream[s : s + length] of the stream
        `table` was computed for (`stream_table`); starts must be multiples of chunk_size."""
        return torch.from_numpy(self.neighbour_tokens(self.table_ids(table, starts, length)))

    def table_ids(
        self, table: np.ndarray, starts: Sequence[int] | np.ndarray, length: int
    ) -> np.ndarray:
        """The neighbour ids (S, L, K) of `table_neighbours`."""
        num_chunks = self._check_length(length)
        starts = np.asarray(starts, dtype=np.int64).reshape(-1)
        if (starts % self.chunk_size).any() or (starts // self.chunk_size + num_chunks).max(
            initial=0
        ) > len(table):
            raise ValueError(
                f"sequence starts must be multiples of data.retrieval.chunk_size="
                f"{self.chunk_size} inside the stream of {len(table)} chunks"
            )
        return self._grid_ids(table, starts, num_chunks)

    def batch_neighbours(self, starts: Sequence[int] | np.ndarray, length: int) -> torch.Tensor:
        """Neighbour tokens (S, L, K, R) long of training sequences stream[s : s + length]."""
        return torch.from_numpy(self.neighbour_tokens(self.sequence_neighbour_ids(starts, length)))

    def query_neighbour_ids(
        self, tokens: np.ndarray, doc_ids: np.ndarray | None = None
    ) -> np.ndarray:
        """Neighbour chunk ids of sequences searched live: tokens (S, T) -> (S, L, K) int64.

        Args:
            tokens: (S, T) token ids, T a multiple of chunk_size.
            doc_ids: same shape, ids in the *training* id space to exclude (chunk u excludes the
                documents of its own tokens and of every later one: the module's exclusion).
                None for text whose documents are not in the database (the usual validation
                split): nothing is excluded.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        s, num_chunks = len(tokens), self._check_length(tokens.shape[1])
        excluded = None
        if doc_ids is not None:
            c, T = self.chunk_size, tokens.shape[1]
            d = np.asarray(doc_ids, dtype=np.int64).reshape(tokens.shape)
            d = np.pad(d, ((0, 0), (0, T)), constant_values=-1)
            pos = np.arange(num_chunks)[:, None] * c + np.arange(max(T, 2 * c))  # (L, W)
            excluded = _excluded_docs(d[:, pos].reshape(s * num_chunks, -1))  # (S·L, X)
        ids = self._query_ids(tokens.reshape(s * num_chunks, self.chunk_size), excluded, True)
        return ids.reshape(s, num_chunks, -1)

    def query_neighbours(
        self, tokens: np.ndarray, doc_ids: np.ndarray | None = None, align: bool = False
    ) -> torch.Tensor:
        """Neighbours of held-out sequences (validation/test): tokens (S, T) -> (S, L, K, R).

        tokens may also be one sequence (T,) -> (L, K, R); see `query_neighbour_ids`; ``align``
        aligns each neighbour to its query chunk (`neighbour_tokens`).
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        squeeze = tokens.ndim == 1
        tokens = tokens.reshape(-1, tokens.shape[-1])  # (S, T)
        if doc_ids is not None:
            doc_ids = np.asarray(doc_ids).reshape(tokens.shape)
        ids = self.query_neighbour_ids(tokens, doc_ids)
        queries = tokens.reshape(*ids.shape[:2], self.chunk_size) if align else None
        out = torch.from_numpy(self.neighbour_tokens(ids, queries))
        return out[0] if squeeze else out


def build_or_load(
    cache_dir: str | os.PathLike,
    tokens: np.ndarray,
    doc_ids: np.ndarray,
    building: Callable[[RetrievalDatabase], AbstractContextManager[object]] | None = None,
    **kwargs,
) -> RetrievalDatabase:
    """Returns the database for this corpus and config, from `cache_dir` when already built.

    kwargs are `RetrievalDatabase`'s keywords (pad_id, chunk_size, num_neighbours, embedder,
    index, nprobe, ef_search, search_margin, precompute). The folder is `cache_dir/retro-<key>`
    (`db.folder` afterwards). `building(db)`, when given, is a context held while a database
    that was not cached is built (a progress bar).
    """
    db = RetrievalDatabase(tokens, doc_ids, **kwargs)
    folder = Path(cache_dir) / f"retro-{db.cache_key()}"
    if db.load(folder):
        return db
    with building(db) if building is not None else nullcontext():
        db.build()
    db.save(folder)
    return db
