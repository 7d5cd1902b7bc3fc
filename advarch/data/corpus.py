"""Text corpora as documents: the standard library's sources, local text and JSON-lines files,
and the seeded split of documents into train/val/test (no document crosses splits); a corpus
of fewer than 3 documents (one book) is cut at line ends into pieces first.

Shared by the text datamodules (`text.py`, `text_domains.py`).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
MIN_DOCUMENTS = len(SPLITS)  # a split by document gives each split one at least
# A corpus of fewer documents is cut into about PIECES pieces, none under MIN_PIECE_CHARS
# characters (a document's short tail joins the piece before it). Changing either changes what
# such a corpus builds without changing its cache key: give the key a new option then.
PIECES = 100
MIN_PIECE_CHARS = 4096
log = logging.getLogger("advarch")
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library .py files, without tests and idlelib (skipped
    folders are not walked: site-packages alone can hold 100× the stdlib's files)."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def matched_files(patterns: str | Sequence[str]) -> list[str]:
    """The files `data.files` matches, a glob or a list of them (`~` expanded, `**`
    recursive), sorted, each once; the folders a recursive glob also matches are not
    documents."""
    return sorted({p for p in _globbed(patterns) if os.path.isfile(p)})


def broken_links(patterns: str | Sequence[str]) -> list[str]:
    """The links `data.files` matches whose target is gone (not in `matched_files`)."""
    return sorted({p for p in _globbed(patterns) if os.path.islink(p) and not os.path.exists(p)})


def _globbed(patterns: str | Sequence[str]) -> list[str]:
    """Every path the globs match (a link to nothing too)."""
    patterns = [patterns] if isinstance(patterns, str) else patterns
    return [p for g in patterns for p in glob.glob(os.path.expanduser(g), recursive=True)]


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hugging Face Hub answers and offline mode is not forced."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")  # the byte-order marks UTF-16 text starts with


def read_text_file(path: str) -> str:
    """A UTF-8 text file without its byte-order mark (Windows editors write one: it is no
    part of the text, nor of a table's first row); one-line ValueErrors name an empty, binary
    or non-UTF-8 file."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"data.files: {path} is empty (0 bytes)")
    if b"\x00" in data[:8192] and not data.startswith(UTF16_MARKS):
        raise ValueError(f"data.files: {path} is a binary file (NUL bytes), not text")
    return decode_utf8(data, "data.files", path).removeprefix("\ufeff")


def decode_utf8(data: bytes, key: str, path: str | Path) -> str:
    """The bytes of file `path` as UTF-8 text, or a one-line ValueError naming the option `key`,
    the file and the first byte that is not UTF-8 (or that it is UTF-16)."""
    if data.startswith(UTF16_MARKS):
        raise ValueError(f"{key}: {path} is UTF-16 text (its byte-order mark): save it as UTF-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 4]
        raise ValueError(
            f"{key}: {path} is not UTF-8: byte offset {err.start} ({bad!r}...)"
        ) from None


def read_jsonl(path: str, field: str) -> dict[int, str]:
    """The `field` of the JSON lines of a file that hold text (row number → text, see
    `rows_with_text`); errors name `file:line`."""
    cells: list[str | None] = []
    # rows end at "\n" only: a JSON string may hold U+2028 or U+0085 raw, which splitlines()
    # would break
    lines = read_text_file(path).split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.files: {path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or field not in row or not isinstance(row[field], str | None):
            raise ValueError(
                f"data.files: {path}:{number}: no string field {field!r} (data.text_field); "
                + what_row_holds(row, field)
            )
        cells.append(row[field])
    return rows_with_text(without_lone_surrogates(cells, path), "data.files", path, field)


def without_lone_surrogates(cells: list[str | None], path: str) -> list[str | None]:
    """`cells` without the lone surrogates JSON escapes can hold (`"\\ud83d"`, half of an
    emoji's UTF-16 pair in cut text), which no UTF-8 text holds, counted in one line: the
    tokenizers would fail on them naming nothing; a .json table's reader drops them too."""
    kept = [None if c is None else c.encode("utf-8", "ignore").decode("utf-8") for c in cells]
    dropped = sum(len(c) - len(k) for c, k in zip(cells, kept, strict=True) if c is not None)
    if dropped:
        log.info("data.files: %s: left out %d lone UTF-16 surrogate characters (%s, half of a "
                 "pair, no UTF-8 text)", path, dropped, r"\ud800-\udfff")  # fmt: skip
    return kept


class NoTextRows(ValueError):
    """A table none of whose rows holds text: among other files it is left out (as an empty
    file is), alone it stops the run with this line."""


def rows_with_text(cells: list[str | None], key: str, name: str, field: str) -> dict[int, str]:
    """Row number → text of a table's `field` cells; a null or empty cell is a row without
    text, left out and counted in one line (the same in JSON lines, CSV, Parquet and datasets);
    `NoTextRows` naming `key` and `name` when no row holds text."""
    kept = {i: text for i, text in enumerate(cells) if text}
    if not cells:
        raise NoTextRows(f"{key}: {name} holds no rows")
    if not kept:
        raise NoTextRows(f"{key}: {name} has no text in its {field!r} (data.text_field): "
                         f"all {len(cells)} rows are empty or null")  # fmt: skip
    if len(kept) < len(cells):
        log.info("%s: %s: left out %d of %d rows with an empty or null %r",
                 key, name, len(cells) - len(kept), len(cells), field)  # fmt: skip
    return kept


def what_row_holds(row: object, field: str) -> str:
    """What a JSON line holds instead of a string `field`: its fields, or its kind."""
    if not isinstance(row, dict):
        return f"the line is a JSON {type(row).__name__}, not an object"
    if field in row:
        return f"it is {row[field]!r}"[:80]
    return f"its fields: {', '.join(row) or 'none'}"


def split_documents(
    n: int, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Indices of documents per split: a seeded permutation cut by fractions (≥1 doc each)."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} "
            "must be in (0, 1) and sum to less than 1"
        )
    if n < 3:
        raise ValueError(f"data: need at least 3 documents to split into train/val/test, found {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(n * val_fraction))
    n_test = max(1, round(n * test_fraction))
    if n_val + n_test >= n:
        raise ValueError(
            f"data: {n} documents leave none to train on with data.val_fraction={val_fraction} "
            f"and data.test_fraction={test_fraction} ({n_val} + {n_test} held out)"
        )
    return {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }


def cut_documents(names: list[str], texts: list[str]) -> tuple[list[str], list[str]]:
    """(names, texts) of a corpus of fewer than 3 documents cut into pieces at line ends, so
    train, val and test each get text of their own; a larger corpus is returned unchanged (its
    split stays by document). A piece is named `<document>:<line>` (`:<line>:<column>` where
    it starts mid-line). One-line ValueError when even the pieces are fewer than 3.
    (`cut_note` says it to the user.)"""
    if len(texts) >= MIN_DOCUMENTS:
        return names, texts
    size = max(sum(map(len, texts)) // PIECES, MIN_PIECE_CHARS)
    cut_names: list[str] = []
    cut_texts: list[str] = []
    for name, text in zip(names, texts, strict=True):
        start, line = 0, 1
        for piece in cut_text(text, size):
            cut_names.append(f"{name}:{place(text, start, line)}")
            cut_texts.append(piece)
            start, line = start + len(piece), line + piece.count("\n")
    if len(cut_texts) < MIN_DOCUMENTS:
        raise ValueError(too_small(names, texts, len(cut_texts)))
    return cut_names, cut_texts


def place(text: str, offset: int, line: int) -> str:
    """`line` (or `line:column` mid-line) of a character offset of `text` on that line."""
    line_start = text.rfind("\n", 0, offset) + 1
    return f"{line}" if offset == line_start else f"{line}:{offset - line_start + 1}"


def cut_text(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, each ending at a line end (in a line much
    longer than `size`, after a space); a tail under MIN_PIECE_CHARS joins the piece before."""
    pieces: list[str] = []
    start = 0
    while len(text) - start >= size + MIN_PIECE_CHARS:
        end = cut_point(text, start, size)
        pieces.append(text[start:end])
        start = end
    tail = text[start:]
    if pieces and len(tail) < MIN_PIECE_CHARS:
        pieces[-1] += tail
    elif tail:
        pieces.append(tail)
    return pieces


def cut_point(text: str, start: int, size: int) -> int:
    """Where the piece of `text` from `start` ends: after the first line end at `size`
    characters or more (in a line longer than 2·`size`: after a space there, else at `size`)."""
    for separator in ("\n", " "):
        found = text.find(separator, start + size - 1, start + 2 * size)
        if found >= 0:
            return found + 1
    return start + size


def cut_note(documents: int, pieces: int) -> str:
    """The line saying a corpus was cut (every run on it logs it: the cache remembers)."""
    return (f"data: {count(documents, 'document')}; cut into {pieces} pieces at line ends (or "
            "spaces, in a long line) for the train/val/test split")  # fmt: skip


def too_small(names: list[str], texts: list[str], pieces: int) -> str:
    """The error for a corpus too small to split even when cut, saying what to add."""
    chars = sum(map(len, texts))
    which = f"{names[0]}, " if len(names) == 1 else ""
    return (
        f"data: {count(len(texts), 'document')} ({which}{count(chars, 'character')}): too small "
        f"to split into train/val/test even cut at line ends into pieces of at least "
        f"{MIN_PIECE_CHARS} characters ({pieces} of the {MIN_DOCUMENTS} needed); add text (over "
        f"{MIN_DOCUMENTS} × {MIN_PIECE_CHARS} characters) or files ({MIN_DOCUMENTS} or more are "
        "split by file)"
    )


def count(n: int, noun: str) -> str:
    """`1 document`, `2 documents`."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
