"""The options `data=text` and `data=text_domains` share, checked by one set of code.

Both datamodules tokenise and pack text the same way, so a value one refuses the other refuses
in the same one line naming the `data.<key>`.
"""

from __future__ import annotations

from advarch.data.tokenizer import BYTE_VOCAB


def check_text_options(
    tokenizer: str, bpe_vocab_size: int, seq_len: int, batch_size: int, max_documents: int | None
) -> None:
    """One-line ValueError naming the `data.<key>` of a value no text datamodule can build."""
    if tokenizer not in ("byte", "bpe"):
        raise ValueError(f"data.tokenizer={tokenizer!r} is not one of: byte, bpe")
    if seq_len < 2:
        raise ValueError(f"data.seq_len={seq_len} must be at least 2")
    if batch_size < 1:
        raise ValueError(f"data.batch_size={batch_size} must be positive")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"data.max_documents={max_documents} must be positive or null")
    if tokenizer == "bpe" and bpe_vocab_size < BYTE_VOCAB:  # (BPE starts from the bytes)
        raise ValueError(f"data.bpe_vocab_size={bpe_vocab_size} must be at least "
                         f"{BYTE_VOCAB} (256 bytes and 3 special tokens)")  # fmt: skip
