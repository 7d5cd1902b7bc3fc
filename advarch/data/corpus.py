"""Text corpora as documents: the standard library's sources, local text and JSON-lines files,
and the seeded split of documents into train/val/test (no document crosses splits).

Shared by the text datamodules (`text.py`, `text_domains.py`).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import sysconfig
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library .py files, without tests and idlelib (skipped
    folders are not walked: site-packages alone can hold 100× the stdlib's files)."""
    files = []
    for folder, subfolders, names in os.walk(sysconfig.get_paths()["stdlib"]):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def matched_files(pattern: str) -> list[str]:
    """The files a `data.files` glob matches (`~` expanded, `**` recursive), sorted; the
    folders a recursive glob also matches are not documents."""
    return sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True)
                  if os.path.isfile(p))  # fmt: skip


def hub_reachable(timeout: float = 3.0) -> bool:
    """True if the Hugging Face Hub answers and offline mode is not forced."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_text_file(path: str) -> str:
    """A UTF-8 text file; one-line ValueErrors name an empty, binary or non-UTF-8 file."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"data.files: {path} is empty (0 bytes)")
    if b"\x00" in data[:8192]:
        raise ValueError(f"data.files: {path} is a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = data[err.start : err.start + 4]
        raise ValueError(
            f"data.files: {path} is not UTF-8: byte offset {err.start} ({bad!r}...)"
        ) from None


def read_jsonl(path: str, field: str) -> list[str]:
    """The `field` of every line of a JSON-lines file; errors name `file:line`."""
    texts = []
    # rows end at "\n" only: a JSON string may hold U+2028 or U+0085 raw, which splitlines()
    # would break; a byte-order mark (Windows editors) is not part of the first row
    lines = read_text_file(path).removeprefix("\ufeff").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.files: {path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(
                f"data.files: {path}:{number}: no string field {field!r} (data.text_field); "
                + what_row_holds(row, field)
            )
        texts.append(row[field])
    if not texts:
        raise ValueError(f"data.files: {path} holds no JSON lines")
    return texts


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
