"""The options `data=text` and `data=text_domains` share, checked and keyed by one set of code.

Both datamodules tokenise and pack text the same way, so a value one refuses the other refuses
in the same one line naming the `data.<key>`, and both key their caches by these options in
the order their keys always had (existing caches keep their names).
"""

from __future__ import annotations

from typing import Any, Protocol

from advarch.data.tokenizer import BYTE_VOCAB


class PackedTextOptions(Protocol):
    """The options a text datamodule's cache is keyed by (`cache_key_options`)."""

    tokenizer_kind: str
    bpe_vocab_size: int
    seq_len: int
    val_fraction: float
    test_fraction: float
    max_documents: int | None
    seed: int


def check_text_options(
    tokenizer: str,
    bpe_vocab_size: int,
    seq_len: int,
    batch_size: int,
    max_documents: int | None,
    max_eval_sequences: int | None,
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
    if max_eval_sequences is not None and max_eval_sequences < 1:  # (0 evaluated nothing)
        raise ValueError(f"data.max_eval_sequences={max_eval_sequences} must be positive, "
                         "or null for every sequence")  # fmt: skip
    if tokenizer == "bpe" and bpe_vocab_size < BYTE_VOCAB:  # (BPE starts from the bytes)
        raise ValueError(f"data.bpe_vocab_size={bpe_vocab_size} must be at least "
                         f"{BYTE_VOCAB} (256 bytes and 3 special tokens)")  # fmt: skip


def cache_key_options(options: PackedTextOptions) -> list[Any]:
    """The shared options a text cache is keyed by, first in every text datamodule's key (the
    order is part of existing caches' names: append new options after it, never inside)."""
    return [
        options.tokenizer_kind,
        options.bpe_vocab_size,
        options.seq_len,
        options.val_fraction,
        options.test_fraction,
        options.max_documents,
        options.seed,
    ]
