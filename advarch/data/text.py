"""Language-model data: documents → train/val/test split by document → tokens → packed sequences.

Sources, in order of precedence: `files` (a glob: .jsonl/.json/.csv/.tsv/.parquet/.arrow are
tables of one document per row, any other file one UTF-8 text document), `dataset` (a folder
written by `save_to_disk`, or a Hugging Face Hub name: fails fast offline), or the default
embedded corpus: the running interpreter's own standard-library sources (~11 MB of real text,
no download). A corpus of fewer than 3 documents (one book) is cut at line ends into about 100
pieces, which are split instead (`corpus.cut_documents`).
Tokenised, packed splits are cached with `datasets` (memory-mapped Arrow) under `cache_dir`,
keyed by a fingerprint of the sources and options, so the second run starts in seconds.
`tokenizer_from` (a text run's checkpoint) tokenises with that model's tokenizer instead of
learning one: what evaluating or fine-tuning it on other text needs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from advarch.data.corpus import (
    SPLITS,
    broken_links,
    cut_documents,
    cut_note,
    matched_files,
    split_documents,
    stdlib_files,
)
from advarch.data.packing import (
    UNIGRAM,
    LMCollate,
    cache_key,
    check_fills_a_batch,
    eval_subset,
    load_or_build,
    pack_splits,
    unigram_token_bits,
)
from advarch.data.sampling import (
    EpochShuffleSampler,
    data_loader,
    eval_sampler,
    samples_done_this_epoch,
    shard,
)
from advarch.data.sources import (
    file_documents,
    folder_files,
    hub_documents,
    local_dataset,
    saved_documents,
)
from advarch.data.text_options import cache_key_options, check_text_options
from advarch.data.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    chosen_tokenizer,
    given_tokenizer_key,
    load_tokenizer,
    token_ids,
    train_tokenizer,
)
from advarch.spec import DataSpec

log = logging.getLogger("advarch")


class TextDataModule(L.LightningDataModule):
    """Packed next-token prediction over a text corpus (see the module docstring)."""

    def __init__(
        self,
        files: str | Sequence[str] | None = None,
        dataset: str | None = None,
        text_field: str = "text",
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        tokenizer_from: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_documents: int | None = None,
        max_eval_sequences: int | None = 512,
        seed: int = 0,
        cache_dir: str = "outputs/cache",
        num_workers: int = 0,
        retrieval: dict | None = None,
        dedupe: bool = False,
    ) -> None:
        super().__init__()
        check_text_options(
            tokenizer, bpe_vocab_size, seq_len, batch_size, max_documents, max_eval_sequences
        )
        if files is not None and dataset is not None:  # (the dataset was left unread)
            raise ValueError(
                f"data.files={files!r} and data.dataset={dataset!r} both name the text: give "
                "one of them"
            )
        if files is not None:
            files = files if isinstance(files, str) else list(files)
            _check_files(files)
        self.files, self.dataset_name, self.text_field = files, dataset, text_field
        self.local_dataset = local_dataset(dataset) if dataset is not None else None
        tokenizer, self.given_tokenizer = chosen_tokenizer(tokenizer, tokenizer_from)
        self.tokenizer_kind, self.bpe_vocab_size = tokenizer, bpe_vocab_size
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.max_documents, self.max_eval_sequences = max_documents, max_eval_sequences
        self.cache_root = Path(cache_dir)
        self.retrieval_cfg = dict(retrieval or {})
        if self.retrieval_cfg:  # every key checked now: faiss failed on some after the build
            from advarch.data.retro_neighbours import RetrievalOptions

            RetrievalOptions.from_config(self.retrieval_cfg)
        self.dedupe = dedupe
        self.splits: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.tokenizer: ByteTokenizer | BPETokenizer | None = None
        self.retriever = None

    # -- sources ------------------------------------------------------------------------------
    def _documents(self) -> tuple[list[str], list[str]]:
        """(names, texts) of every document of the source."""
        if self.files is not None:
            if broken := broken_links(self.files):
                log.info("data.files: left out %d broken link(s), e.g. %s", len(broken),
                         _link(broken[0]))  # fmt: skip
            return file_documents(matched_files(self.files), self.text_field)
        if self.local_dataset is not None:
            return saved_documents(self.local_dataset, self.dataset_name, self.text_field)
        if self.dataset_name is not None:
            return hub_documents(self.dataset_name, self.text_field)
        paths = stdlib_files()
        return [str(p) for p in paths], [
            p.read_text(encoding="utf-8", errors="replace") for p in paths
        ]

    def _fingerprint(self) -> str:
        if self.files is not None:
            paths = matched_files(self.files)
            source = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]
        elif self.local_dataset is not None:
            source = ["load_from_disk", folder_files(self.local_dataset)]
        elif self.dataset_name is not None:
            source = [self.dataset_name]
        else:
            source = [(str(p), p.stat().st_size) for p in stdlib_files()]
        options = [
            *cache_key_options(self),
            self.text_field,
            2,
            *(["dedupe"] if self.dedupe else []),  # keeps earlier caches' keys
            *given_tokenizer_key(self.given_tokenizer),
        ]
        return cache_key(source, options)

    # -- preparation --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    def _prepare(self) -> None:
        """Load the cached splits, or build them: split, tokenize, pack, save atomically."""
        if self.splits:
            return
        import datasets

        def load(folder: Path) -> tuple[Any, dict[str, Any]]:
            for split in SPLITS:  # retrieval and reports read these: damaged, rebuild them
                for array in ("tokens", "docs"):
                    np.load(folder / f"{split}_{array}.npy", mmap_mode="r")
            splits = {s: datasets.load_from_disk(str(folder / s)) for s in SPLITS}
            tokenizer = load_tokenizer(self.tokenizer_kind, folder)
            return tokenizer, {s: ds.with_format("torch") for s, ds in splits.items()}

        cache = self.cache_root / f"text-{self._fingerprint()}"
        self.meta, (self.tokenizer, self.splits) = load_or_build(cache, self._build, load)
        self.cache_dir = cache
        if "cut" in self.meta:  # one document (a book): said on every run, not only a build
            log.info(cut_note(**self.meta["cut"]))
        if self.retrieval_cfg:
            self._attach_retrieval(cache)

    def _build(self, tmp: Path) -> dict[str, Any]:
        """Split, tokenise and pack the documents into `tmp`; returns the meta."""
        names, texts = self._documents()
        if self.max_documents is not None:
            names, texts = names[: self.max_documents], texts[: self.max_documents]
        if self.dedupe:  # a byte-identical copy would hand a held-out document to the model
            keep = sorted({text: i for i, text in reversed(list(enumerate(texts)))}.values())
            names, texts = [names[i] for i in keep], [texts[i] for i in keep]
        documents = len(texts)
        names, texts = cut_documents(names, texts)  # (fewer than 3: pieces of them)
        parts = split_documents(len(texts), self.val_fraction, self.test_fraction, self.seed)
        train_texts = [texts[i] for i in parts["train"]]
        tok = train_tokenizer(
            self.tokenizer_kind, train_texts, self.bpe_vocab_size, tmp, self.given_tokenizer
        )
        sizes, packed = pack_splits(tok, texts, parts, self.seq_len, tmp)
        meta: dict[str, Any] = {**token_ids(tok), "documents": {}, **sizes}
        if len(texts) != documents:
            meta["cut"] = {"documents": documents, "pieces": len(texts)}
        for split, (tokens, doc_ids) in packed.items():  # (retrieval and reports read these)
            meta["documents"][split] = [names[i] for i in parts[split]]
            np.save(tmp / f"{split}_tokens.npy", tokens)
            np.save(tmp / f"{split}_docs.npy", doc_ids)
        return meta

    def _attach_retrieval(self, cache: Path) -> None:
        from advarch.data.retro_neighbours import NeighbourLookup

        self.retriever = NeighbourLookup.build(self, cache, **self.retrieval_cfg)

    # -- contract -----------------------------------------------------------------------------
    @property
    def spec(self) -> DataSpec:
        self._prepare()
        check_fills_a_batch(len(self.splits["train"]), "train split", self.seq_len, self.batch_size)
        r = self.retriever
        return DataSpec(
            kind="lm",
            vocab_size=self.meta["vocab_size"],
            seq_len=self.seq_len,
            pad_id=self.meta["pad_id"],
            padded_inputs=False,  # packed: every sequence is seq_len tokens of text
            eos_id=self.meta["eos_id"],
            bos_id=self.meta["bos_id"],
            retrieval_neighbours=r.k if r else 0,
            retrieval_chunk=r.chunk_size if r else 64,
            retrieval_neighbour_len=r.neighbour_len if r else 128,
            extras={
                "bytes_per_token": {split: self.bytes_per_token(split) for split in SPLITS},
                "token_bytes": self.tokenizer.token_bytes(),  # exact bits per byte
                "unigram_bits": unigram_token_bits(
                    [self.splits["train"]], self.meta["vocab_size"], self.cache_dir / UNIGRAM
                ),
                "unigram_bpb": self.meta["unigram_bpb"],
                "tokenizer": self.tokenizer_kind,
            },
        )

    def bytes_per_token(self, split: str) -> float:
        return self.meta[f"{split}_bytes"] / self.meta[f"{split}_tokens"]

    def _eval_subset(self, split: str):
        return eval_subset(self.splits[split], self.max_eval_sequences)

    def _loader(self, ds, shuffle: bool, split: str) -> DataLoader:
        sampler = eval_sampler(len(ds), self.trainer)
        if shuffle:
            skip = samples_done_this_epoch(self.trainer, self.batch_size)
            epoch = int(getattr(self.trainer, "current_epoch", 0) or 0)
            sampler = EpochShuffleSampler(len(ds), self.seed, skip, epoch, **shard(self.trainer))
        return data_loader(
            ds,
            self.seed,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=LMCollate(self.retriever, split),
            drop_last=shuffle,
        )

    def train_dataloader(self) -> DataLoader:
        self._prepare()
        return self._loader(self.splits["train"], True, "train")

    def val_dataloader(self) -> DataLoader:
        self._prepare()
        return self._loader(self._eval_subset("val"), False, "val")

    def test_dataloader(self) -> DataLoader:
        self._prepare()
        return self._loader(self._eval_subset("test"), False, "test")


def _check_files(files: str | list[str]) -> None:
    """FileNotFoundError naming the `data.files` glob (or list element) that matches no file."""
    if not files:
        raise FileNotFoundError("data.files=[] names no file (null: the embedded corpus)")
    for i, pattern in enumerate([files] if isinstance(files, str) else files):
        if matched_files(pattern):
            continue
        key = "data.files" if isinstance(files, str) else f"data.files[{i}]"
        folder = Path(pattern).expanduser().is_dir()
        broken = broken_links(pattern)
        hint = (
            f"; it is a folder: its files are {key}='{pattern.rstrip('/')}/*'"
            if folder
            else f" but {len(broken)} broken link(s), e.g. {_link(broken[0])}"
            if broken
            else ""
        )
        raise FileNotFoundError(f"{key}={pattern!r} matches no file{hint}")


def _link(path: str) -> str:
    """`path → its missing target`, for the one-line notes on broken links."""
    return f"{path} → {os.readlink(path)}"
