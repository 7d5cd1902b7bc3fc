"""Packing tokenised documents into language-model rows, the collate function, the unigram
baseline and the atomic cache folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from advarch.data.packing import LMCollate, load_or_build, pack_documents, unigram_bits_per_byte
from advarch.data.tokenizer import ByteTokenizer


def test_packed_rows_overlap_by_one_token_and_record_documents(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    tokens, doc_ids = pack_documents(tok, ["abc", "de"], np.array([7, 9]), 2, tmp_path, "docs")
    assert tokens.tolist() == [97, 98, 99, 256, 100, 101, 256]  # documents joined by <eos>
    assert doc_ids.tolist() == [7, 7, 7, 7, 9, 9, 9]
    rows = datasets.load_from_disk(str(tmp_path))[:]
    assert rows["tokens"] == [[97, 98, 99], [99, 256, 100], [100, 101, 256]]
    assert rows["start"] == [0, 2, 4]
    with pytest.raises(ValueError, match=r"the docs has 3 tokens, fewer than data.seq_len=8\+1"):
        pack_documents(tok, ["ab"], np.array([0]), 8, tmp_path / "short", "docs")


def test_collate_shifts_rows_into_inputs_and_labels() -> None:
    rows = [{"tokens": torch.tensor([1, 2, 3])}, {"tokens": torch.tensor([4, 5, 6])}]
    batch = LMCollate()(rows)
    assert batch["input_ids"].tolist() == [[1, 2], [4, 5]]
    assert batch["labels"].tolist() == [[2, 3], [5, 6]] and "neighbours" not in batch


def test_unigram_baseline_matches_a_hand_computation() -> None:
    train = np.array([0, 0, 1, 2])
    val = np.array([0, 1])
    counts = np.array([2, 1, 1]) + 1.0
    p = counts / counts.sum()
    expected = -(np.log2(p[0]) + np.log2(p[1])) / 2
    assert unigram_bits_per_byte(train, val, 3, val_bytes=2) == pytest.approx(expected)


def test_a_cache_folder_is_built_once(tmp_path: Path) -> None:
    calls = []

    def build(folder: Path) -> dict:
        calls.append(folder)
        (folder / "data.txt").write_text("x")
        return {"n": 1}

    def load(folder: Path) -> str:
        return (folder / "data.txt").read_text()

    cache = tmp_path / "cache"
    assert load_or_build(cache, build, load) == ({"n": 1}, "x") == load_or_build(cache, build, load)
    assert len(calls) == 1 and calls[0] != cache  # built beside it, then moved into place
    assert not calls[0].exists()
    (cache / "data.txt").unlink()  # damaged: built again, once
    assert load_or_build(cache, build, load) == ({"n": 1}, "x") and len(calls) == 2


def test_a_cache_another_run_built_meanwhile_is_read_not_replaced(tmp_path: Path) -> None:
    # new user 42: two runs building one new cache at once (a parallel sweep's trials): the
    # second to finish deleted the first's folder as the first read it (`Directory …/train not
    # found`); now it reads that folder and drops its own build
    cache, theirs = tmp_path / "cache", []

    def build(folder: Path) -> dict:
        (folder / "data.txt").write_text("ours")
        cache.mkdir()  # the other run finishes first
        (cache / "data.txt").write_text("theirs")
        (cache / "meta.json").write_text('{"n": 2}')
        theirs.append(cache.stat().st_ino)
        return {"n": 1}

    result = load_or_build(cache, build, lambda folder: (folder / "data.txt").read_text())
    assert result == ({"n": 2}, "theirs") and cache.stat().st_ino == theirs[0]  # not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nor our build left behind


def test_a_damaged_cache_two_runs_rebuild_at_once_is_theirs_or_ours(tmp_path, monkeypatch):
    # review 42b: both runs found the cache damaged and rebuilt it; the other run's folder
    # landed between this one's removal of the damaged folder and its rename: `[Errno 39]
    # Directory not empty`, and its temporary folder stayed behind
    import advarch.data.packing as packing

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text("{damaged")
    real_rmtree = shutil.rmtree

    def rmtree_then_theirs_lands(path, *args, **kwargs) -> None:
        real_rmtree(path, *args, **kwargs)
        if Path(path) == cache:
            cache.mkdir()
            (cache / "data.txt").write_text("theirs")
            (cache / "meta.json").write_text('{"n": 2}')

    def build(folder: Path) -> dict:
        (folder / "data.txt").write_text("ours")
        return {"n": 1}

    monkeypatch.setattr(packing.shutil, "rmtree", rmtree_then_theirs_lands)
    result = load_or_build(cache, build, lambda folder: (folder / "data.txt").read_text())
    assert result == ({"n": 2}, "theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_failed_build_leaves_nothing_and_killed_ones_are_cleared(tmp_path: Path) -> None:
    def failing(folder: Path) -> dict:
        (folder / "half.txt").write_text("x")
        raise ValueError("data: bad file")

    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="bad file"):
        load_or_build(cache / "text-a", failing, lambda folder: None)
    assert not cache.exists()  # no half-built text-a.tmp<pid>, nor the cache folder it made
    killed = cache / "text-b.tmp999999999"  # another data's build, its process gone
    killed.mkdir(parents=True)
    load_or_build(cache / "text-c", lambda folder: {"n": 1}, lambda folder: None)
    assert sorted(p.name for p in cache.iterdir()) == ["text-c"]


def test_a_build_error_that_names_no_file_keeps_its_kind_and_words(tmp_path: Path) -> None:
    # review 37b: 543e6e4 re-raises every OSError without a filename as `OSError(errno,
    # strerror, cache)` to name the cache of a full disk; a ConnectionError (an OSError: the
    # offline Hub's `data.dataset=… needs the Hugging Face Hub, which is unreachable`) became
    # `OSError: [Errno None] None: '<cache>'`, a traceback instead of its one line
    message = "data.dataset='x' needs the Hugging Face Hub, which is unreachable (offline)"

    def build(tmp: Path) -> dict:
        raise ConnectionError(message)

    with pytest.raises(ConnectionError, match=r"^data\.dataset='x' needs the Hugging Face Hub"):
        load_or_build(tmp_path / "cache" / "text-0", build, lambda folder: None)
