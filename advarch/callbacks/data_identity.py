"""Which data a checkpoint was trained on, so that a resume never trains on other data.

A datamodule with a cache (`data=text` and the data built on it) names its cache folder after
a fingerprint of its documents (each file's path, size and modification time) and options.
Adding, removing or editing a file changes the document-level split and, with BPE, the
tokenizer: a resumed run would go on with documents it trained on now in val/test and ids that
mean other tokens, and say nothing. Checkpoints record the fingerprint; a resume whose data
differs stops with one line, and `eval.py` / `generate.py` warn (`data_changed`).

Checkpoints of text also carry their tokenizer (`saved_tokenizer`): `generate.py` decodes with
the tokenizer the model learnt, whatever happened to the files since.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from advarch.checkpoint import TOKENIZER, CheckpointError, describe
from advarch.data.tokenizer import BPETokenizer, ByteTokenizer, from_state, tokenizer_state

log = logging.getLogger("advarch")

KEY = "data_cache"  # the checkpoint entry: the name of the data's cache folder
HELD_OUT = ("val", "test")


def data_cache(datamodule: Any) -> str | None:
    """The name of a prepared datamodule's cache folder (its data's fingerprint), if it has one."""
    folder = getattr(datamodule, "cache_dir", None)
    return Path(folder).name if folder else None


def data_changed(checkpoint: dict[str, Any], datamodule: Any) -> str | None:
    """Why the prepared `datamodule` holds other data than `checkpoint` was trained on, or None
    (also when either does not say)."""
    saved, now = checkpoint.get(KEY), data_cache(datamodule)
    if saved is None or now is None or saved == now:
        return None
    return (f"its data changed since it was written (cache {saved} then, {now} now: "
            f"{_file_changes(saved, datamodule)}), so documents may have moved between train, "
            "val and test and a BPE tokenizer may give other ids")  # fmt: skip


def _file_changes(saved: str, datamodule: Any) -> str:
    """Which files the data gained and lost since the cache `saved` was built (`data/b.txt
    added`), read from both caches' document names where the old one is still beside this
    one's; else (or where the same files were edited) what may have happened."""

    def files(meta: dict[str, Any]) -> set[str]:  # (a table's rows are `<file>#<row>`)
        return {n.rsplit("#", 1)[0] for names in split_documents_of(meta).values() for n in names}

    try:
        meta = json.loads((Path(datamodule.cache_dir).parent / saved / "meta.json").read_text())
    except (OSError, ValueError):
        return "files added, removed or edited"
    then, now = files(meta), files(getattr(datamodule, "meta", None) or {})
    changes = [(sorted(now - then), "added"), (sorted(then - now), "removed")]
    said = [f"{_some(names)} {verb}" for names, verb in changes if names]
    return ", ".join(said) if said else "files edited"


def _some(names: list[str], shown: int = 3) -> str:
    """`a.txt`, `a.txt, b.txt` … or `5 files (a.txt, b.txt, c.txt, …)`."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{len(names)} files ({', '.join(names[:shown])}, …)"


def held_out_trained_on(checkpoint: dict[str, Any], datamodule: Any) -> dict[str, list[str]]:
    """{split: names} of the prepared `datamodule`'s validation and test documents that
    `checkpoint`'s run trained on: a fine-tune on other options of the same corpus
    (`data.max_documents`, `data.seed`, …) splits it otherwise, and its held-out metrics
    would measure text its base learnt. Read from the base's data cache (its `meta.json`
    names each split's documents) where it is beside this data's; empty where it is not, the
    data is the same or either keeps no document names."""
    saved, now = checkpoint.get(KEY), data_cache(datamodule)
    documents = split_documents_of(getattr(datamodule, "meta", None) or {})
    if saved is None or now is None or saved == now or not documents:
        return {}
    try:
        meta = json.loads((Path(datamodule.cache_dir).parent / saved / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    trained = set(split_documents_of(meta).get("train", ()))
    seen = {split: [n for n in documents.get(split, []) if n in trained] for split in HELD_OUT}
    return {split: names for split, names in seen.items() if names}


def split_documents_of(meta: dict[str, Any]) -> dict[str, list[str]]:
    """{split: document names} a text cache's meta records: `documents` (data=text), or each
    domain's `<split>_documents` (data=text_domains); {} where it names none."""
    if isinstance(meta.get("documents"), dict):
        return meta["documents"]
    named: dict[str, list[str]] = {}
    for domain in (meta.get("domains") or {}).values():
        for split in ("train", *HELD_OUT):
            named.setdefault(split, []).extend(domain.get(f"{split}_documents", []))
    return {split: names for split, names in named.items() if names}


def saved_tokenizer(checkpoint: dict[str, Any]) -> ByteTokenizer | BPETokenizer | None:
    """The tokenizer a checkpoint was trained with (None: not text, or written before
    checkpoints carried it)."""
    state = checkpoint.get(TOKENIZER)
    return from_state(state) if state else None


class DataIdentity(L.Callback):
    """Record the data's fingerprint and tokenizer in every checkpoint; refuse to resume on
    other data."""

    def __init__(
        self, ckpt_path: str | None = None, auto: bool = False, changes: Sequence[str] = ()
    ) -> None:
        """Args:
        ckpt_path: the checkpoint the run resumes from (None: a fresh start).
        auto: it was found by `ckpt_path=auto` (so the "resuming" line says).
        changes: what the resume's other options change (warnings under the "resuming" line).
        """
        self.ckpt_path = ckpt_path
        self.auto = auto
        self.changes = list(changes)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:  # fmt: skip
        name = data_cache(trainer.datamodule)
        if name is not None:
            checkpoint[KEY] = name
        tokenizer = tokenizer_state(getattr(trainer.datamodule, "tokenizer", None))
        if tokenizer is not None:
            checkpoint[TOKENIZER] = tokenizer

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:  # fmt: skip
        # (the data is set up by now, nothing is logged yet)
        changed = data_changed(checkpoint, trainer.datamodule)
        if changed:
            raise CheckpointError(f"ckpt_path={self.ckpt_path!r}: {changed}; restore the files "
                                  "or start a new run (ckpt_path=null)")  # fmt: skip
        if trainer.is_global_zero:  # announced once accepted: never before its refusal
            where = "ckpt_path=auto: " if self.auto else ""
            log.info("%sresuming %s (%s)", where, self.ckpt_path, describe(checkpoint))
            for change in self.changes:
                log.warning("%s", change)
