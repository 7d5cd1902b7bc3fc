"""data=text and data=text_domains refuse the same options, and a train split smaller than a
batch, in the same one line, and keep the cache keys they had before they shared that code."""

from __future__ import annotations

from pathlib import Path

import pytest

from advarch.data.corpus import stdlib_files
from advarch.data.packing import cache_key
from advarch.data.text import TextDataModule
from advarch.data.text_domains import TextDomainsDataModule, domain_files

DATAMODULES = [TextDataModule, TextDomainsDataModule]
# (options, the whole refusal)
BAD_OPTIONS = [
    ({"tokenizer": "word"}, "data.tokenizer='word' is not one of: byte, bpe"),
    ({"seq_len": 1}, "data.seq_len=1 must be at least 2"),
    ({"batch_size": 0}, "data.batch_size=0 must be positive"),
    ({"max_documents": 0}, "data.max_documents=0 must be positive or null"),
    (  # (validation and testing scored nothing, and the run said nothing of it)
        {"max_eval_sequences": 0},
        "data.max_eval_sequences=0 must be positive, or null for every sequence",
    ),
    (  # (data=text_domains trained with it)
        {"tokenizer": "bpe", "bpe_vocab_size": 100},
        "data.bpe_vocab_size=100 must be at least 259 (256 bytes and 3 special tokens)",
    ),
]


@pytest.mark.parametrize("datamodule", DATAMODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    ("options", "refusal"), BAD_OPTIONS, ids=[",".join(o) for o, _ in BAD_OPTIONS]
)
def test_both_text_datamodules_refuse_a_bad_option_in_the_same_line(
    datamodule: type, options: dict, refusal: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError) as caught:
        datamodule(**options, cache_dir=str(tmp_path))
    assert str(caught.value) == refusal


def test_text_domains_refuses_fewer_files_than_splits(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        TextDomainsDataModule(max_documents=2, cache_dir=str(tmp_path))
    assert str(caught.value) == (
        "data.max_documents=2 must be at least 3 or null: each domain's files are split into "
        "train/val/test"
    )


@pytest.mark.parametrize(
    ("datamodule", "options", "split"),
    [
        (TextDataModule, {"max_documents": 40}, "train split"),
        (TextDomainsDataModule, {"domains": ["codecs"], "max_documents": 3}, "codecs train split"),
    ],
    ids=["text", "text_domains"],
)
def test_a_train_split_smaller_than_a_batch_is_refused_naming_it(
    datamodule: type, options: dict, split: str, cache_dir: Path
) -> None:
    dm = datamodule(**options, seq_len=64, batch_size=10**6, cache_dir=str(cache_dir))
    with pytest.raises(ValueError) as caught:
        _ = dm.spec
    assert str(caught.value).startswith(f"data: the {split} packs into ")
    assert str(caught.value).endswith(
        " sequences of data.seq_len=64 tokens, fewer than data.batch_size=1000000: not one "
        "training batch; lower data.batch_size or data.seq_len, or add documents"
    )


def stdlib_source() -> list:
    """What data=text keys its default corpus by: each stdlib file and its size."""
    return [(str(p), p.stat().st_size) for p in stdlib_files()]


def domains_source(domains: tuple[str, ...]) -> dict:
    """What data=text_domains keys its corpus by: each domain's files and their sizes."""
    return {d: [(str(p), p.stat().st_size) for p in fs] for d, fs in domain_files(domains).items()}


# (datamodule, its options, the option list its _fingerprint wrote out before they were shared)
KEYS = [
    (TextDataModule, {}, ["byte", 4096, 256, 0.05, 0.05, None, 0, "text", 2]),
    (
        TextDataModule,
        {
            "tokenizer": "bpe",
            "bpe_vocab_size": 300,
            "max_documents": 5,
            "seq_len": 32,
            "seed": 3,
            "dedupe": True,
        },
        ["bpe", 300, 32, 0.05, 0.05, 5, 3, "text", 2, "dedupe"],
    ),
    (TextDomainsDataModule, {}, ["byte", 4096, 256, 0.1, 0.1, None, 0, 1]),
    (
        TextDomainsDataModule,
        {
            "domains": ["net"],
            "tokenizer": "bpe",
            "bpe_vocab_size": 500,
            "max_documents": 6,
            "val_fraction": 0.2,
        },
        ["bpe", 500, 256, 0.2, 0.1, 6, 0, 1],
    ),
]


@pytest.mark.parametrize(
    ("datamodule", "options", "key_options"),
    KEYS,
    ids=["text", "text_set", "text_domains", "text_domains_set"],
)
def test_cache_keys_are_those_of_before_the_options_were_shared(
    datamodule: type, options: dict, key_options: list, tmp_path: Path
) -> None:
    # a changed key would build every existing cache again
    dm = datamodule(**options, cache_dir=str(tmp_path))
    source = stdlib_source() if datamodule is TextDataModule else domains_source(dm.domains)
    assert dm._fingerprint() == cache_key(source, key_options)
