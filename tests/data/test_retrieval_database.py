"""Retrieval database: chunking, exact and approximate search, document exclusion, disk cache."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from advarch.data.chunk_embedders import HashedNgramEmbedder
from advarch.data.retrieval_database import RetrievalDatabase, build_or_load, chunk_documents

PAD = 256


def make_corpus(num_docs: int, mean_len: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Byte-level documents of random words (lengths 1..2·mean_len), ids shuffled."""
    rng = np.random.default_rng(seed)
    words = [bytes(rng.integers(97, 123, size=rng.integers(2, 8)).tolist()) for _ in range(300)]
    ids = rng.permutation(num_docs) * 3 + 5  # arbitrary, non-contiguous doc ids
    tokens, docs = [], []
    for d in ids:
        n = int(rng.integers(1, 2 * mean_len))
        text = b" ".join(rng.choice(words, size=n // 3 + 1))[:n]
        tokens.append(np.frombuffer(text, np.uint8).astype(np.int64))
        docs.append(np.full(len(text), d))
    return np.concatenate(tokens), np.concatenate(docs)


def chunk_documents_reference(tokens, doc_ids, c, pad):
    """Loop over documents."""
    chunks, owner, nxt = [], [], []
    bounds = [0, *np.flatnonzero(np.diff(doc_ids)) + 1, len(tokens)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for s in range(a, b, c):
            piece = list(tokens[s : min(s + c, b)])
            chunks.append(piece + [pad] * (c - len(piece)))
            owner.append(doc_ids[a])
            nxt.append(len(chunks) if s + c < b else -1)
    return np.array(chunks), np.array(owner), np.array(nxt)


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(num_docs=120, mean_len=150, seed=1)


@pytest.fixture(scope="module")
def db(corpus):
    tokens, docs = corpus
    return RetrievalDatabase(tokens, docs, pad_id=PAD, chunk_size=16, num_neighbours=3).build()


def test_chunking_matches_reference(corpus):
    tokens, docs = corpus
    got = chunk_documents(tokens, docs, 16, PAD)
    want = chunk_documents_reference(tokens, docs, 16, PAD)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_exact_index_returns_true_nearest_neighbours(db):
    emb = db.embedder.embed(db.chunks[:50])
    nothing = np.full((50, 1), -1)
    got = db.search(emb, nothing)
    scores = emb @ np.asarray(db.embeddings).T  # (50, M) brute force
    want_scores = -np.sort(-scores, axis=1)[:, : db.num_neighbours]
    np.testing.assert_allclose(np.take_along_axis(scores, got, 1), want_scores, atol=1e-5)


def test_ivf_and_hnsw_agree_with_flat(corpus):
    """IVF probing every list is exact; HNSW with a wide search and IVF-PQ re-ranked from the
    exact embeddings are near exact (by score)."""
    tokens, docs = corpus
    kw = dict(pad_id=PAD, chunk_size=16, num_neighbours=2)
    flat = RetrievalDatabase(tokens, docs, index="flat", **kw).build()
    ivf = RetrievalDatabase(tokens, docs, index="ivf", nprobe=10_000, **kw).build()
    hnsw = RetrievalDatabase(tokens, docs, index="hnsw", ef_search=256, **kw).build()
    pq = RetrievalDatabase(tokens, docs, index="ivfpq", nprobe=10_000, **kw).build()
    assert (ivf.resolved_index_kind, hnsw.resolved_index_kind) == ("ivf", "hnsw")
    assert pq.index.code_size == 32  # 256 dims / 8: one byte per sub-quantiser
    c, e = flat.chunk_size, np.asarray(flat.embeddings)
    q = flat.embedder.embed(tokens[: flat.num_query_chunks * c].reshape(-1, c))  # (Q, d)

    def top1_scores(db):
        return np.einsum("qd,qd->q", q, e[db.train_neighbours[:, 0]])

    want = top1_scores(flat)
    np.testing.assert_allclose(top1_scores(ivf), want, atol=1e-5)
    assert np.isclose(top1_scores(hnsw), want, atol=1e-5).mean() > 0.97
    assert np.isclose(top1_scores(pq), want, atol=1e-5).mean() > 0.9


def _assert_no_leak(db, starts, length, ids):
    """No neighbour's document appears in its query chunk, the chunk after it, or the rest
    of its sequence (and the token its last position predicts)."""
    c, n = db.chunk_size, len(db.tokens)
    for s, seq_ids in zip(starts, ids, strict=True):
        for u, chunk_ids in enumerate(seq_ids):
            a = s + u * c
            forbidden = set(db.doc_ids[a : min(max(a + 2 * c, s + length + 1), n)].tolist())
            got = {int(db.chunk_doc[i]) for i in chunk_ids if i >= 0}
            assert not got & forbidden, (s, u, got & forbidden)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_document_neighbours_never_returned(seed):
    tokens, docs = make_corpus(num_docs=200, mean_len=40, seed=seed)  # many short documents
    db = RetrievalDatabase(tokens, docs, pad_id=PAD, chunk_size=8, num_neighbours=4).build()
    rng = np.random.default_rng(seed)
    length = 32
    starts = np.r_[
        rng.integers(0, len(tokens) // 8 - 4, 20) * 8, rng.integers(0, len(tokens) - length, 10)
    ]
    ids = db.sequence_neighbour_ids(starts, length)
    assert ids.shape == (30, 4, 4) and (ids >= 0).all()
    _assert_no_leak(db, starts, length, ids)
    # Grid-aligned table and live search agree on exclusion-filtered top hits.
    live = db._stream_neighbour_ids((starts[:20, None] + np.arange(4) * 8).ravel(), True)
    np.testing.assert_array_equal(live.reshape(20, 4, 4)[..., 0], ids[:20, :, 0])


def test_duplicate_document_is_found_but_original_is_excluded():
    tokens, docs = make_corpus(num_docs=30, mean_len=200, seed=3)
    copy_of = docs == docs[0]
    tokens2 = np.r_[tokens, tokens[copy_of]]
    docs2 = np.r_[docs, np.full(copy_of.sum(), 10_000)]
    db = RetrievalDatabase(tokens2, docs2, pad_id=PAD, chunk_size=16, num_neighbours=2).build()
    first_doc_chunks = copy_of.sum() // 16
    ids = db.sequence_neighbour_ids([0], first_doc_chunks * 16)[0]  # (L, 2)
    assert (db.chunk_doc[ids[:, 0]] == 10_000).all()  # the verbatim copy, never itself
    nb = db.batch_neighbours([0], 16)[0]  # (1, 2, 32): chunk + continuation
    assert nb.shape == (1, 2, 32) and nb.dtype.is_floating_point is False
    np.testing.assert_array_equal(nb[0, 0, :16].numpy(), tokens[:16])
    np.testing.assert_array_equal(nb[0, 0, 16:].numpy(), tokens[16:32])


def test_neighbour_tokens_pad_continuation_and_missing(db):
    last = np.flatnonzero(db.next_chunk < 0)[0]
    toks = db.neighbour_tokens(np.array([last, -1]))
    assert toks.shape == (2, 32)
    assert (toks[0, 16:] == PAD).all()  # continuation past the document end
    assert (toks[1] == PAD).all()  # missing neighbour


def versions_db(shift: int) -> tuple[RetrievalDatabase, np.ndarray]:
    """A document and its other version (``shift`` tokens inserted at its start) in one
    database; returns it and the new version's tokens."""
    old, docs = make_corpus(num_docs=1, mean_len=200, seed=4)
    old = old[:160]
    new = np.r_[np.arange(shift) % 26 + 65, old]
    tokens = np.r_[old, new, make_corpus(num_docs=20, mean_len=60, seed=5)[0]]
    doc_ids = np.r_[
        np.zeros(len(old)), np.ones(len(new)), np.full(len(tokens) - 2 * len(old) - shift, 2)
    ]
    db = RetrievalDatabase(tokens, doc_ids.astype(np.int64), pad_id=PAD, chunk_size=16,
                           num_neighbours=1).build()  # fmt: skip
    return db, new


@pytest.mark.parametrize("shift", [0, 5, 11, 16, 21])
def test_aligned_neighbours_line_up_with_the_query_and_its_continuation(shift):
    db, new = versions_db(shift)
    c = 16
    for u in range(2, 6):  # query chunk u of the new version; its neighbour: old chunk u − 1
        query = new[u * c : (u + 1) * c]
        ids = np.array([[u - 1, u, -1]])
        aligned = db.neighbour_tokens(ids, query[None])[0]  # (3, 32)
        for k, chunk in enumerate(ids[0, :2]):  # old chunk `chunk` needs an offset of:
            if abs(u * c - shift - chunk * c) <= c:  # within reach: chunk + continuation line up
                np.testing.assert_array_equal(aligned[k], new[u * c : (u + 2) * c])
        assert (aligned[2] == PAD).all()  # missing stays missing
        plain = db.neighbour_tokens(ids)[0]
        np.testing.assert_array_equal(plain[0], db.tokens[(u - 1) * c : (u + 1) * c])


def test_alignment_stays_inside_the_neighbours_document():
    db, new = versions_db(0)
    query = np.full(16, 7)  # agrees with nothing: shift 0, the plain neighbour
    first = np.array([0])  # first chunk of document 0: nothing before it in the document
    np.testing.assert_array_equal(db.neighbour_tokens(first, query), db.neighbour_tokens(first))
    query = db.tokens[:16].copy()
    query[:8] = PAD  # a query matching the first chunk's second half 8 tokens to the left
    query[8:] = db.tokens[:8]
    got = db.neighbour_tokens(first, query)[0]
    assert (got[:8] == PAD).all() and (got[8:] == db.tokens[:24]).all()


def test_too_few_chunks_outside_own_documents_are_padded(caplog):
    tokens = np.arange(96) % 50
    docs = np.r_[np.zeros(64, int), np.ones(32, int)]  # doc 1 has 2 chunks of 16, doc 0 has 4
    with caplog.at_level(logging.WARNING):
        db = RetrievalDatabase(tokens, docs, pad_id=PAD, chunk_size=16, num_neighbours=3).build()
    assert "padding" in caplog.text
    ids = db.sequence_neighbour_ids([0], 32)[0]  # chunks 0,1 of doc 0: only doc 1's 2 chunks
    assert (ids[:, :2] >= 0).all() and (ids[:, 2] == -1).all()
    assert (db.batch_neighbours([0], 32)[0][:, 2] == PAD).all()
    with pytest.raises(ValueError, match="fewer neighbours"):
        db.search(db.embedder.embed(db.chunks[:1]), np.array([[0]]), missing_ok=False)


def test_held_out_queries(db, corpus):
    tokens, _ = corpus
    held_out = make_corpus(num_docs=3, mean_len=100, seed=9)[0][:64].reshape(2, 32)
    nb = db.query_neighbours(held_out)
    assert nb.shape == (2, 2, 3, 32)
    assert db.query_neighbours(held_out[0]).shape == (2, 3, 32)
    table = db.stream_table(held_out.ravel())  # (4, 3) precomputed once per held-out split
    np.testing.assert_array_equal(db.table_neighbours(table, [0, 32], 32).numpy(), nb.numpy())
    with pytest.raises(ValueError, match="multiples of data.retrieval.chunk_size"):
        db.table_neighbours(table, [8], 32)
    # Training text with its doc ids gets the training exclusion rule (the last chunk can
    # differ: the document after the sequence's end is unknown to query_neighbours).
    docs = db.doc_ids[:64].reshape(2, 32)
    np.testing.assert_array_equal(
        db.query_neighbours(tokens[:64].reshape(2, 32), docs)[0, 0].numpy(),
        db.batch_neighbours([0], 32)[0][0].numpy(),
    )


def test_length_not_multiple_of_chunk_raises(db):
    with pytest.raises(ValueError, match=r"T=20 .*data\.retrieval\.chunk_size=16"):
        db.batch_neighbours([0], 20)[0]
    with pytest.raises(ValueError, match="sequence starts"):
        db.batch_neighbours([len(db.tokens) - 16], 32)


def test_validation_errors_name_keys(corpus):
    tokens, docs = corpus
    for kw, key in [
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_neighbours": 0}, "num_neighbours"),
        ({"index": "annoy"}, "index"),
    ]:
        with pytest.raises(ValueError, match=rf"data\.retrieval\.{key}="):
            RetrievalDatabase(tokens, docs, pad_id=PAD, **kw)


class CountingEmbedder(HashedNgramEmbedder):
    calls = 0

    def embed(self, chunks):
        CountingEmbedder.calls += 1
        return super().embed(chunks)


def test_cache_round_trip(tmp_path, corpus):
    tokens, docs = corpus
    kw = dict(pad_id=PAD, chunk_size=16, num_neighbours=2, embedder=CountingEmbedder(pad_id=PAD))
    first = build_or_load(tmp_path, tokens, docs, **kw)
    built_calls = CountingEmbedder.calls
    second = build_or_load(tmp_path, tokens, docs, **kw)
    assert CountingEmbedder.calls == built_calls  # nothing re-embedded
    np.testing.assert_array_equal(first.train_neighbours, second.train_neighbours)
    np.testing.assert_array_equal(first.embeddings, second.embeddings)
    assert second._index is None  # deserialised lazily, only for live queries
    np.testing.assert_array_equal(first.batch_neighbours([3], 32), second.batch_neighbours([3], 32))
    assert not list(tmp_path.rglob("*.tmp"))
    build_or_load(tmp_path, tokens, docs, **{**kw, "num_neighbours": 3})
    build_or_load(tmp_path, tokens[:-1], docs[:-1], **kw)
    assert len(list(tmp_path.glob("retro-*"))) == 3  # k and the corpus are part of the key


@pytest.mark.parametrize("damaged", ["embeddings.npy", "index.faiss", "neighbours.npy"])
def test_a_truncated_cache_file_is_built_again(tmp_path, corpus, caplog, damaged):
    # ("mmap length is greater than file size" with no file named; a 110-line faiss traceback
    # at the first batch)
    tokens, docs = corpus
    kw = dict(pad_id=PAD, chunk_size=16, num_neighbours=2, embedder=CountingEmbedder(pad_id=PAD))
    first = build_or_load(tmp_path, tokens, docs, **kw)
    path = first.folder / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    calls = CountingEmbedder.calls
    with caplog.at_level("WARNING"):
        again = build_or_load(tmp_path, tokens, docs, **kw)
    assert f"is damaged ({damaged}: " in caplog.text and CountingEmbedder.calls > calls
    np.testing.assert_array_equal(first.train_neighbours, again.train_neighbours)
    assert build_or_load(tmp_path, tokens, docs, **kw).folder == again.folder  # whole again


def test_ivfpq_cache_is_memory_mapped_and_searches_the_same(tmp_path, corpus):
    tokens, docs = corpus
    kw = dict(pad_id=PAD, chunk_size=16, num_neighbours=2, index="ivfpq", nprobe=8)
    first = build_or_load(tmp_path, tokens, docs, **kw)
    second = build_or_load(tmp_path, tokens, docs, **kw)
    assert second._index is None and (second._index_path.name == "index.faiss")
    assert isinstance(second.embeddings, np.memmap)
    live = np.arange(3, 400, 7)  # off-grid starts: searched live through the mapped index
    np.testing.assert_array_equal(
        first.sequence_neighbour_ids(live, 32), second.sequence_neighbour_ids(live, 32)
    )
    import pickle

    clone = pickle.loads(pickle.dumps(second))  # a worker maps the index from its path
    np.testing.assert_array_equal(
        clone.sequence_neighbour_ids(live, 32), second.sequence_neighbour_ids(live, 32)
    )


def test_lazy_table_searches_rows_on_first_use_and_equals_the_precomputed(tmp_path, corpus):
    tokens, docs = corpus
    kw = dict(pad_id=PAD, chunk_size=16, num_neighbours=2)
    eager = RetrievalDatabase(tokens, docs, **kw).build()
    lazy = build_or_load(tmp_path, tokens, docs, precompute=False, **kw)
    assert (lazy.train_neighbours == -2).all()  # nothing searched at build
    starts = np.array([0, 48, 160, 5])  # grid-aligned rows and one live start
    np.testing.assert_array_equal(
        lazy.batch_neighbours(starts, 32), eager.batch_neighbours(starts, 32)
    )
    searched = (lazy.train_neighbours != -2).all(1)
    assert searched.sum() == 6 and searched[[0, 1, 3, 4, 10, 11]].all()
    again = build_or_load(tmp_path, tokens, docs, precompute=False, **kw)  # cached, copy-on-write
    np.testing.assert_array_equal(
        again.batch_neighbours(starts, 32), eager.batch_neighbours(starts, 32)
    )
    assert (np.load(next(tmp_path.glob("retro-*/neighbours.npy"))) == -2).all()


def test_database_pickles_for_dataloader_workers(db):
    import pickle

    clone = pickle.loads(pickle.dumps(db))
    np.testing.assert_array_equal(clone.batch_neighbours([5], 32), db.batch_neighbours([5], 32))


def test_no_neighbour_from_a_document_later_in_the_same_training_sequence():
    """RETRO (Borgeaud et al. 2022) trains without neighbours from the training sequence's own
    documents. Chunk u's neighbours enter the residual stream at the token completing chunk u
    (chunked cross-attention), and causal self-attention then carries them to EVERY later
    position of the sequence, not only to chunk u + 1 (a RETRO `Model`'s logits at chunks
    u + 1 … L − 1 all change with chunk u's neighbours). So a neighbour of chunk u may not come
    from a document whose tokens the sequence predicts at or after chunk u; excluding only the
    documents of chunks u and u + 1 hands the model, e.g., the exact text of chunk u + 3.

    Stream (chunk 4, one 16-token training sequence at 0): chunk 0 = doc A's start, chunk 1 =
    A's end + doc B, chunks 2-3 = doc D, whose first chunk repeats A's first chunk."""
    c, T = 4, 16
    a, b, d = [10, 11, 12, 13, 14, 15], [90, 91], [10, 11, 12, 13, 20, 21, 22, 23]
    rng = np.random.default_rng(0)
    others = [rng.integers(30, 80, 12) for _ in range(20)]  # unrelated documents
    parts = [a, b, d, *others]
    tokens = np.concatenate([np.asarray(p) for p in parts])
    docs = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
    db = RetrievalDatabase(tokens, docs, pad_id=PAD, chunk_size=c, num_neighbours=2,
                           index="flat").build()  # fmt: skip
    ids = db.sequence_neighbour_ids([0], T)[0]  # (L, K)
    for u in range(T // c):
        predicted_later = set(docs[u * c : T].tolist())  # documents the sequence still predicts
        got = {int(db.chunk_doc[i]) for i in ids[u] if i >= 0}
        assert not got & predicted_later, (
            f"chunk {u}'s neighbours come from documents {sorted(got & predicted_later)} that "
            f"the same sequence predicts from chunk {u} on: {db.neighbour_tokens(ids[u]).tolist()}"
        )
