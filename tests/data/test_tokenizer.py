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


def test_tokenizers_compare_by_what_they_encode_not_by_how_their_json_is_written(tmp_path) -> None:
    # tokenizers 0.20 writes merges as pairs where earlier versions wrote "a b" strings: a base
    # checkpoint of an older version was refused as "its merges learnt on other text"
    import json

    from advarch.data.tokenizer import BPETokenizer, tokenizer_difference, tokenizer_state

    bpe = BPETokenizer.train(["alpha beta gamma delta " * 50], 300, tmp_path / "bpe.json")
    state = tokenizer_state(bpe)
    written = json.loads(state["json"])
    written["model"]["merges"] = [" ".join(pair) for pair in written["model"]["merges"]]
    older = {"kind": "bpe", "json": json.dumps(written, indent=1)}
    assert older != state and tokenizer_difference(state, older) is None
    other = BPETokenizer.train(["one two three four " * 50], 300, tmp_path / "other.json")
    assert tokenizer_difference(state, tokenizer_state(other)) is not None
    assert tokenizer_state(object()) is None  # (a user's own tokenizer: not compared)
