"""Tokenizers round-trip any text, including text that spells a special token."""

from __future__ import annotations

from pathlib import Path

import pytest

from advarch.data.tokenizer import train_tokenizer

TEXT = "tokens like <eos> and <pad> and <bos> appear in code: café, 𝔘, \r\n"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_text_spelling_a_special_token_stays_text(kind: str, tmp_path: Path) -> None:
    tok = train_tokenizer(kind, [TEXT * 20, "def f(x):\n    return x\n" * 20], 300, tmp_path)
    ids = [int(i) for i in tok.encode_batch([TEXT])[0]]
    assert tok.decode(ids) == TEXT
    specials = {tok.eos_id, tok.pad_id, tok.bos_id}
    assert not specials & set(ids)  # a literal "<eos>" never ends a document, "<pad>" never masks
