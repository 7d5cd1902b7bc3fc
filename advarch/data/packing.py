"""Tokenised corpora packed for language modelling, as the text datamodules cache them.

`pack_documents` joins documents with <eos> and cuts the stream into rows of seq_len + 1
tokens saved as an Arrow dataset, `pack_splits` does it for each of train/val/test and returns
their sizes for the meta; `load_or_build` builds a cache folder once, atomically;
`LMCollate` turns rows into input_ids/labels (plus RETRO neighbours); `unigram_token_bits` is
the baseline every language-model evaluation scores beside its own bits per byte
(`unigram_bits_per_byte`: the same on a whole split, kept in the meta). Shared by `text.py` and
`text_domains.py`.

Shapes: B batch, T = seq_len.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from advarch.atomic import process_alive
from advarch.data.corpus import SPLITS
from advarch.data.tokenizer import BPETokenizer, ByteTokenizer
from advarch.errors import WRITE_ERRORS
from advarch.reasons import short_reason

log = logging.getLogger("advarch")
T = TypeVar("T")
UNIGRAM = "train_unigram_counts.npy"  # a cache folder's counts of its training targets


def cache_key(source: Any, options: list[Any]) -> str:
    """16 hex digits naming a text cache folder: the corpus (files with their sizes, or a
    dataset name) and every option that changes what is built."""
    return hashlib.sha256(json.dumps([source, options]).encode()).hexdigest()[:16]


def load_or_build(
    cache: Path, build: Callable[[Path], dict[str, Any]], load: Callable[[Path], T]
) -> tuple[dict[str, Any], T]:
    """(meta.json, `load(cache)`) of a cache folder. A missing folder is built: `build(tmp)`
    fills a temporary folder and returns the meta, and the folder is moved into place
    atomically, unless another process (a parallel trial) put its own there first: that one
    is read, never deleted under its readers. A damaged one (unreadable meta, a missing or
    truncated file) is built again, with a warning naming it; so are the temporary folders of
    builds that were killed."""
    _remove_abandoned_builds(cache)
    if (cache / "meta.json").exists():
        try:
            return json.loads((cache / "meta.json").read_text()), load(cache)
        except Exception as err:  # noqa: BLE001  (any damage: json, arrow, missing files)
            reason = short_reason(err)
            log.warning("data cache %s is damaged (%s): building it again", cache, reason)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "meta.json").write_text(json.dumps(build(tmp)))
    except BaseException as err:  # bad data, Ctrl-C: no half-built folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            cache.parent.rmdir()  # nor a cache folder this build made and left empty
        if isinstance(err, OSError) and err.filename is None and err.errno in WRITE_ERRORS:
            raise type(err)(err.errno, err.strerror, str(cache)) from err  # (a write(): names
        raise  # the cache, not the run folder)
    for _ in range(3):  # (a damaged folder that another run replaces too: theirs is read)
        try:
            os.rename(tmp, cache)  # (never over a folder that another run built meanwhile)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        else:
            return json.loads((cache / "meta.json").read_text()), load(cache)
        try:  # another run (a parallel sweep's trial) built it first, and may be reading it
            found = json.loads((cache / "meta.json").read_text()), load(cache)
        except Exception:  # noqa: BLE001  (the damaged folder this build replaces)
            shutil.rmtree(cache, ignore_errors=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            return found
    shutil.rmtree(tmp, ignore_errors=True)
    raise OSError(errno.ENOTEMPTY, "other runs keep replacing this data cache", str(cache))


def _remove_abandoned_builds(cache: Path) -> None:
    """Delete the `<any cache>.tmp<pid>` folders beside `cache` whose process is gone (a build
    killed midway, whatever data it was for)."""
    for tmp in cache.parent.glob("*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def eval_subset(ds: Any, n: int | None) -> Any:
    """`n` evenly spaced rows of a dataset (all of it when n is None or larger)."""
    if n is None or n >= len(ds):
        return ds
    return ds.select(np.linspace(0, len(ds) - 1, n).round().astype(int).tolist())


class TooFewTokens(ValueError):
    """A split holds fewer tokens than one packed sequence; its sizes stay readable, so a
    program that sets seq_len from its own option can name that option instead."""

    def __init__(self, label: str, tokens: int, seq_len: int) -> None:
        super().__init__(
            f"data: the {label} has {tokens} tokens, fewer than data.seq_len={seq_len}+1; add "
            "documents or shorten seq_len"
        )
        self.label, self.tokens, self.seq_len = label, tokens, seq_len


def pack_documents(
    tok: ByteTokenizer | BPETokenizer,
    docs: list[str],
    doc_index: np.ndarray,
    seq_len: int,
    out: Path,
    label: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise `docs`, join them with <eos>, cut the stream into rows of `seq_len` + 1 tokens
    (consecutive rows share one token) and save them as an Arrow dataset at `out`
    (columns `tokens` (T+1,) and `start`); `label` names the documents in errors.

    Returns:
        `(tokens, doc_ids)`: the whole token stream and, per token, its document's index
        (from `doc_index`), both int32.

    Raises:
        TooFewTokens: naming `data.seq_len` when the documents hold fewer than seq_len+1 tokens.
    """
    import datasets
    import pyarrow as pa

    encoded = tok.encode_batch(docs)
    tokens = np.concatenate([np.append(e, tok.eos_id) for e in encoded]).astype(np.int32)
    doc_ids = np.repeat(doc_index, [len(e) + 1 for e in encoded]).astype(np.int32)
    n_seq = (len(tokens) - 1) // seq_len
    if n_seq < 1:
        raise TooFewTokens(label, len(tokens), seq_len)
    window = seq_len + 1
    starts = np.arange(n_seq) * seq_len
    rows = tokens[starts[:, None] + np.arange(window)]  # (n_seq, T+1)
    table = pa.table(
        {
            "tokens": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), window),
            "start": pa.array(starts.astype(np.int64)),
        }
    )
    datasets.Dataset(table).save_to_disk(str(out))
    return tokens, doc_ids


def pack_splits(
    tok: ByteTokenizer | BPETokenizer,
    texts: list[str],
    parts: dict[str, np.ndarray],
    seq_len: int,
    out: Path,
    corpus: str | None = None,
) -> tuple[dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Pack each split's documents (`parts`: indices into `texts`) into `out/<split>` with
    `pack_documents`; `corpus` (a domain) names the splits in errors.

    Returns:
        `(sizes, packed)`: the meta both text datamodules keep per corpus (`<split>_tokens`,
        `<split>_bytes`, the val `unigram_bpb`), and each split's `(tokens, doc_ids)`.
    """
    sizes: dict[str, Any] = {}
    packed = {}
    for split in SPLITS:
        docs = [texts[i] for i in parts[split]]
        label = f"{corpus} {split} split" if corpus else f"{split} split"
        packed[split] = pack_documents(tok, docs, parts[split], seq_len, out / split, label)
        sizes[f"{split}_tokens"] = int(len(packed[split][0]))
        sizes[f"{split}_bytes"] = int(sum(len(d.encode("utf-8")) for d in docs))
    sizes["unigram_bpb"] = unigram_bits_per_byte(
        packed["train"][0], packed["val"][0], tok.vocab_size, sizes["val_bytes"]
    )
    return sizes, packed


def check_fills_a_batch(sequences: int, label: str, seq_len: int, batch_size: int) -> None:
    """One-line ValueError when a training split (`label`, e.g. `train split`) packs into fewer
    sequences than one batch: `data=text`'s loader drops that partial batch and would train on
    nothing; a task stream would train the task for one short step, not data.steps_per_task."""
    if sequences < batch_size:
        raise ValueError(
            f"data: the {label} packs into {sequences} sequences of data.seq_len={seq_len} "
            f"tokens, fewer than data.batch_size={batch_size}: not one training batch; lower "
            "data.batch_size or data.seq_len, or add documents"
        )


class LMCollate:
    """Rows of `tokens` (T+1) → input_ids/labels (B, T), plus RETRO neighbours when enabled."""

    def __init__(self, retriever: Any = None, split: str = "train") -> None:
        self.retriever, self.split = retriever, split

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        tokens = torch.stack([r["tokens"] for r in rows]).long()
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
        if self.retriever is not None:
            starts = torch.stack([r["start"] for r in rows])
            batch["neighbours"] = self.retriever.neighbours(self.split, starts, tokens.shape[1] - 1)
        return batch


def unigram_token_bits(trains: list[Any], vocab_size: int, counts_file: Path) -> list[float]:
    """Bits of each token id under the add-one unigram model of the training targets of
    `trains` (packed-row datasets): the baseline scored beside every evaluation's bits per
    byte, on the same tokens (`Objective`). The counts are kept in `counts_file` (a cache
    folder's, where it can be written), so a run reads the training split once per cache."""
    if counts_file.is_file():
        counts = np.load(counts_file)
    else:
        counts = np.zeros(vocab_size, dtype=np.int64)
        for ds in trains:
            for rows in ds.with_format("numpy").iter(batch_size=4096):
                counts += np.bincount(rows["tokens"][:, 1:].ravel(), minlength=vocab_size)
        tmp = counts_file.with_name(f"{counts_file.stem}.tmp{os.getpid()}.npy")
        with contextlib.suppress(OSError):  # (a cache this user cannot write: count each run)
            np.save(tmp, counts)
            os.replace(tmp, counts_file)  # (atomic: two runs may count at once)
    smoothed = counts.astype(np.float64) + 1.0
    return (-np.log2(smoothed / smoothed.sum())).tolist()


def unigram_bits_per_byte(
    train: np.ndarray, val: np.ndarray, vocab_size: int, val_bytes: int
) -> float:
    """Cross-entropy of val under the add-one unigram distribution of train, in bits per byte."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log2p = np.log2(counts / counts.sum())
    return float(-log2p[val].sum() / val_bytes)
