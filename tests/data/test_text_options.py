"""data=text and data=text_domains refuse the same options, and a train split smaller than a
batch, in the same one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from advarch.data.text import TextDataModule
from advarch.data.text_domains import TextDomainsDataModule

DATAMODULES = [TextDataModule, TextDomainsDataModule]
# (options, the whole refusal)
BAD_OPTIONS = [
    ({"tokenizer": "word"}, "data.tokenizer='word' is not one of: byte, bpe"),
    ({"seq_len": 1}, "data.seq_len=1 must be at least 2"),
    ({"batch_size": 0}, "data.batch_size=0 must be positive"),
    ({"max_documents": 0}, "data.max_documents=0 must be positive or null"),
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
