"""data=text and data=text_domains refuse the same options in the same one line."""

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
