"""Tokenizers: byte-level (no training, vocab 256 + specials) and BPE trained with `tokenizers`;
the helpers that train one for a corpus cache folder, reload it, record its ids, and turn it
into a checkpoint entry and back (`tokenizer_state`, `from_state`), so that text is generated
with the very tokenizer a model was trained with."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BYTE_VOCAB = 259  # 256 byte values and <eos>, <pad>, <bos>


class ByteTokenizer:
    """UTF-8 bytes as ids 0–255, then specials: <eos>=256, <pad>=257, <bos>=258."""

    name = "byte"

    def __init__(self) -> None:
        self.eos_id, self.pad_id, self.bos_id = 256, 257, 258
        self.vocab_size = BYTE_VOCAB

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of each id's text: 1 for a byte, 0 for the specials (bits per byte)."""
        return [1] * 256 + [0] * (self.vocab_size - 256)


class BPETokenizer:
    """Byte-level BPE from the `tokenizers` library, trained on the training split and cached."""

    name = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        """Wrap a trained `tokenizers.Tokenizer` with the special tokens <eos>, <pad>, <bos>."""
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True  # "<eos>" written in a document is its text
        self.eos_id = self.tokenizer.token_to_id("<eos>")
        self.pad_id = self.tokenizer.token_to_id("<pad>")
        self.bos_id = self.tokenizer.token_to_id("<bos>")
        self.vocab_size = self.tokenizer.get_vocab_size()

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        """The tokenizer saved at `path` (`tokenizers`' JSON)."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer of a JSON string (`to_json`)."""
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, path: Path) -> BPETokenizer:
        """Train on `texts` and save to `path` (atomically), unless `path` already exists."""
        if not path.exists():
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=["<eos>", "<pad>", "<bos>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            tok.train_from_iterator(texts, trainer=trainer)
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
        return cls.load(path)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes of each id's text (bits per byte): a ByteLevel token writes each byte as
        one character of its alphabet; the specials (<eos>, …) are no text, 0 bytes."""
        from tokenizers import pre_tokenizers

        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        specials = set(self.tokenizer.get_added_tokens_decoder())
        return [
            0 if i in specials else _byte_level_length(self.tokenizer.id_to_token(i), alphabet)
            for i in range(self.vocab_size)
        ]


def _byte_level_length(token: str | None, alphabet: set[str]) -> int:
    """Bytes a ByteLevel token stands for: one per alphabet character (any other character,
    from a tokenizer of another kind, counts its own UTF-8 bytes)."""
    return sum(1 if ch in alphabet else len(ch.encode("utf-8")) for ch in token or "")


def train_tokenizer(
    kind: str,
    texts: list[str],
    bpe_vocab_size: int,
    folder: Path,
    given: BPETokenizer | None = None,
) -> ByteTokenizer | BPETokenizer:
    """The byte tokenizer, or a BPE trained on `texts`, saved as `folder/bpe.json`; or the
    `given` BPE (`chosen_tokenizer`), saved there as if trained, where a trained model's ids
    must keep their meaning."""
    if given is not None:
        (folder / "bpe.json").write_text(given.to_json(), encoding="utf-8")
        return given
    if kind == "bpe":
        return BPETokenizer.train(texts, bpe_vocab_size, folder / "bpe.json")
    return ByteTokenizer()


def chosen_tokenizer(kind: str, tokenizer_from: str | None) -> tuple[str, BPETokenizer | None]:
    """(`data.tokenizer`'s kind, the BPE to use as it is) of the options `tokenizer` and
    `tokenizer_from`: the latter's tokenizer decides both where it is given (a byte-level one
    needs no file)."""
    if tokenizer_from is None:
        return kind, None
    given = read_tokenizer(tokenizer_from)
    return given.name, given if isinstance(given, BPETokenizer) else None


def read_tokenizer(path: str, key: str = "data.tokenizer_from") -> ByteTokenizer | BPETokenizer:
    """The tokenizer of a text run's checkpoint (or of a BPE `bpe.json`, a data cache's): the
    ids a trained model knows. One line naming `key` and the file where there is none."""
    file = Path(path).expanduser()
    if file.suffix == ".json":
        if not file.is_file():
            raise FileNotFoundError(f"{key}={path!r}: no such file")
        try:
            return BPETokenizer.load(file)
        except Exception as err:  # tokenizers' parse errors: name the file, one line
            raise ValueError(f"{key}={path!r} is not a tokenizer's JSON file ({err})") from err
    from advarch.checkpoint import TOKENIZER, read_checkpoint

    state = read_checkpoint(path, key, require=None, mmap=True).get(TOKENIZER)
    if not state:
        raise ValueError(
            f"{key}={path!r} carries no tokenizer: give a checkpoint of a text run (or the "
            "bpe.json of its data cache)"
        )
    return from_state(state)


def given_tokenizer_key(tok: BPETokenizer | None) -> list[str]:
    """What a data cache's key adds for a `given` tokenizer: a hash of its vocabulary and
    merges (nothing without one, so that earlier caches keep their keys)."""
    if tok is None:
        return []
    state = json.dumps(tokenizer_state(tok), sort_keys=True).encode("utf-8")
    return ["tokenizer_from", hashlib.sha256(state).hexdigest()[:16]]


def load_tokenizer(kind: str, folder: Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer `train_tokenizer` made for a cache folder."""
    return BPETokenizer.load(folder / "bpe.json") if kind == "bpe" else ByteTokenizer()


def token_ids(tok: ByteTokenizer | BPETokenizer) -> dict[str, int]:
    """The meta fields every tokenised cache records: vocabulary size and special ids."""
    return {
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
    }


def tokenizer_state(tok: object) -> dict[str, str] | None:
    """A checkpoint entry that rebuilds `tok` (`from_state`): its kind, and BPE's JSON; None
    for a tokenizer of another kind (a user's datamodule's), which advarch cannot rebuild."""
    if isinstance(tok, BPETokenizer):
        return {"kind": "bpe", "json": tok.to_json()}
    return {"kind": "byte"} if isinstance(tok, ByteTokenizer) else None


def from_state(state: dict[str, str]) -> ByteTokenizer | BPETokenizer:
    """The tokenizer a `tokenizer_state` entry describes."""
    return BPETokenizer.from_json(state["json"]) if state["kind"] == "bpe" else ByteTokenizer()


def tokenizer_difference(first: dict[str, str] | None, second: dict[str, str] | None
                         ) -> tuple[str, str] | None:  # fmt: skip
    """How two `tokenizer_state` entries differ, each described, or None where they are equal
    or either is unknown: token ids of one mean other text to a model of the other."""
    if (
        not first
        or not second
        or tokenizer_state(from_state(first)) == tokenizer_state(from_state(second))
    ):  # (written anew: tokenizers' versions write the same merges differently)
        return None
    one, other = describe_tokenizer(first), describe_tokenizer(second)
    return (one, other) if one != other else (f"{one}, its merges learnt on other text", other)


def describe_tokenizer(state: dict[str, str]) -> str:
    """`BPE, 512 ids` or `bytes, 259 ids`: a `tokenizer_state` entry in words."""
    kind = "bytes" if state["kind"] == "byte" else "BPE"
    return f"{kind}, {from_state(state).vocab_size} ids"
