"""Continual language modelling: the embedded corpus as a stream of domains.

The standard library's source files (`advarch.data.corpus.stdlib_files`) are grouped into
families of packages, one domain each, by the file's top-level module or package name
(`email/parser.py` → `email` → `net`). The table `DOMAINS` is fixed, so the grouping is
deterministic, and a file belongs to at most one domain (files of no listed family, e.g.
`tkinter` or `distutils`, are left out). Inside each domain the files are split into
train/val/test by document (`split_documents`, seeded), so no file leaks across splits.

`TextDomainsDataModule` is a task stream (`advarch/data/stream.py`): one domain per epoch,
`steps_per_task` batches each (drawn without replacement from the domain's packed training
sequences, again once all are drawn, a new draw every epoch, resumable mid-epoch), one
validation/test loader per domain. Every batch carries `task` (the domain id), so per-domain
expert masks can route by it. The spec's `extras` hold the UTF-8 bytes of each token id and
its bits under the unigram model of all domains' training text, so strategies report bits
per byte (per domain too) and the unigram baseline over the tokens they score.

Shapes: B batch, T sequence length.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from advarch.data.corpus import MIN_DOCUMENTS, SPLITS, split_documents, stdlib_files
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
from advarch.data.sampling import EpochShuffleSampler, data_loader, eval_sampler
from advarch.data.stdlib_domains import DEFAULT_DOMAINS, DOMAINS, check_domains
from advarch.data.stream import TaskStreamMixin
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
from advarch.spec import DataSpec, TaskSchedule

Scenario = Literal["domain", "task"]
CACHE_VERSION = 1


def domain_of(path: Path, root: Path) -> str | None:
    """The domain of a standard-library file (by its top-level name), or None."""
    top = path.relative_to(root).parts[0].removesuffix(".py")
    return next((d for d, names in DOMAINS.items() if top in names), None)


def domain_files(domains: tuple[str, ...]) -> dict[str, list[Path]]:
    """The sorted standard-library files of each domain in `domains`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[Path]] = {d: [] for d in domains}
    for path in stdlib_files():
        domain = domain_of(path, root)
        if domain in out:
            out[domain].append(path)
    return out


class DomainCollate(LMCollate):
    """LM batches (input_ids, labels (B, T)) plus each row's domain id `task` (B,)."""

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        batch["task"] = torch.stack([r["task"] for r in rows]).long()
        return batch


class TextDomainsDataModule(TaskStreamMixin, L.LightningDataModule):
    """Next-token prediction over a stream of standard-library domains (module docstring).

    Args:
        domains: domain names from `DOMAINS`, in training order (at least 1).
        steps_per_task: training batches per domain (one epoch per domain).
        scenario: `domain` (no domain id at evaluation) or `task` (evaluation knows the
            domain: per-domain expert masks route by it).
        tokenizer: `byte` or `bpe` (trained on the union of the domains' training files).
        bpe_vocab_size: vocabulary size for `bpe`.
        tokenizer_from: a text run's checkpoint whose tokenizer to use instead (`tokenizer`
            and `bpe_vocab_size` then follow it).
        seq_len: tokens per packed sequence.
        batch_size: sequences per batch.
        val_fraction, test_fraction: fractions of each domain's files held out.
        max_documents: use only the first N files of each domain (quick experiments; at
            least 3, one per split).
        max_eval_sequences: evenly spaced val/test sequences evaluated per domain (None = all).
        seed: seed of the file split and of the training order.
        cache_dir: where tokenised, packed domains are cached (Arrow).
        num_workers: DataLoader worker processes.
    """

    epochs_per_task = 1

    def __init__(
        self,
        domains: list[str] | tuple[str, ...] = DEFAULT_DOMAINS,
        steps_per_task: int = 75,
        scenario: Scenario = "domain",
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
        tokenizer_from: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        max_documents: int | None = None,
        max_eval_sequences: int | None = 32,
        seed: int = 0,
        cache_dir: str = "outputs/cache",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_domains(domains)
        if steps_per_task < 1:
            raise ValueError(f"data.steps_per_task={steps_per_task} must be >= 1")
        if scenario not in ("domain", "task"):
            raise ValueError(f"data.scenario={scenario!r} must be 'domain' or 'task'")
        check_text_options(
            tokenizer, bpe_vocab_size, seq_len, batch_size, max_documents, max_eval_sequences
        )
        if max_documents is not None and max_documents < MIN_DOCUMENTS:  # (split by file)
            raise ValueError(f"data.max_documents={max_documents} must be at least "
                             f"{MIN_DOCUMENTS} or null: each domain's files are split into "
                             "train/val/test")  # fmt: skip
        self.domains = tuple(domains)
        self.num_tasks = len(self.domains)
        self.schedule = TaskSchedule(self.num_tasks, self.epochs_per_task)
        self.steps_per_task, self.scenario = steps_per_task, scenario
        tokenizer, self.given_tokenizer = chosen_tokenizer(tokenizer, tokenizer_from)
        self.tokenizer_kind, self.bpe_vocab_size = tokenizer, bpe_vocab_size
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.max_documents, self.max_eval_sequences = max_documents, max_eval_sequences
        self.cache_root = Path(cache_dir)
        self.data: dict[str, list[Any]] = {}
        self.meta: dict[str, Any] = {}
        self.tokenizer: ByteTokenizer | BPETokenizer | None = None

    # -- preparation --------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        files = domain_files(self.domains)
        source = {d: [(str(p), p.stat().st_size) for p in fs] for d, fs in files.items()}
        options = [
            *cache_key_options(self),
            CACHE_VERSION,
            *given_tokenizer_key(self.given_tokenizer),
        ]
        return cache_key(source, options)

    def prepare_data(self) -> None:
        self._prepare()

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    def _prepare(self) -> None:
        """Load the cached domains, or build them: split, tokenize, pack, save atomically."""
        if self.data:
            return
        import datasets

        def load(folder: Path) -> tuple[Any, dict[str, list[Any]]]:
            data: dict[str, list[Any]] = {split: [] for split in SPLITS}
            for split in SPLITS:
                for task, domain in enumerate(self.domains):
                    ds = datasets.load_from_disk(str(folder / domain / split))
                    ds = ds.add_column("task", np.full(len(ds), task, dtype=np.int64))
                    data[split].append(ds.with_format("torch"))
            return load_tokenizer(self.tokenizer_kind, folder), data

        cache = self.cache_root / f"text_domains-{self._fingerprint()}"
        self.meta, (self.tokenizer, self.data) = load_or_build(cache, self._build, load)
        self.cache_dir = cache

    def _build(self, tmp: Path) -> dict[str, Any]:
        """Split each domain's files, tokenise and pack them into `tmp`; returns the meta."""
        files = domain_files(self.domains)
        texts: dict[str, list[str]] = {}
        parts: dict[str, dict[str, np.ndarray]] = {}
        for domain, paths in files.items():
            paths = paths[: self.max_documents] if self.max_documents is not None else paths
            files[domain] = paths
            texts[domain] = [p.read_text(encoding="utf-8", errors="replace") for p in paths]
            parts[domain] = split_documents(
                len(paths), self.val_fraction, self.test_fraction, self.seed
            )
        train_texts = [texts[d][i] for d in self.domains for i in parts[d]["train"]]
        tok = train_tokenizer(
            self.tokenizer_kind, train_texts, self.bpe_vocab_size, tmp, self.given_tokenizer
        )
        meta: dict[str, Any] = {**token_ids(tok), "domains": {}}
        for domain in self.domains:
            info, _ = pack_splits(
                tok, texts[domain], parts[domain], self.seq_len, tmp / domain, domain
            )
            for split, index in parts[domain].items():
                info[f"{split}_documents"] = [str(files[domain][i]) for i in index]
            meta["domains"][domain] = info
        return meta

    # -- contract -----------------------------------------------------------------------------
    @property
    def spec(self) -> DataSpec:
        self._prepare()
        for domain, train in zip(self.domains, self.data["train"], strict=True):
            check_fills_a_batch(len(train), f"{domain} train split", self.seq_len, self.batch_size)
        info = [self.meta["domains"][d] for d in self.domains]
        val_bytes = sum(i["val_bytes"] for i in info)
        return DataSpec(
            kind="lm",
            vocab_size=self.meta["vocab_size"],
            seq_len=self.seq_len,
            task_names=self.domains,
            pad_id=self.meta["pad_id"],
            padded_inputs=False,  # packed: every sequence is seq_len tokens of text
            eos_id=self.meta["eos_id"],
            bos_id=self.meta["bos_id"],
            extras={
                "bytes_per_token": {
                    split: sum(i[f"{split}_bytes"] for i in info)
                    / sum(i[f"{split}_tokens"] for i in info)
                    for split in SPLITS
                },
                "task_bytes_per_token": {
                    split: [i[f"{split}_bytes"] / i[f"{split}_tokens"] for i in info]
                    for split in SPLITS
                },
                "unigram_bpb": sum(i["unigram_bpb"] * i["val_bytes"] for i in info) / val_bytes,
                "token_bytes": self.tokenizer.token_bytes(),  # exact bits per byte
                "unigram_bits": unigram_token_bits(  # (of all domains' training text)
                    self.data["train"], self.meta["vocab_size"], self.cache_dir / UNIGRAM
                ),
                "scenario": self.scenario,
                "epochs_per_task": self.epochs_per_task,
                "steps_per_task": self.steps_per_task,
                "tokenizer": self.tokenizer_kind,
            },
        )

    def epoch_samples(self, task: int) -> int:
        """One epoch of a domain is `steps_per_task` batches."""
        return self.steps_per_task * self.batch_size

    def task_loader(
        self, split: str, task: int, batch_size: int, shuffle: bool, seed: int
    ) -> DataLoader:
        """Shuffled: the whole set in a `seed` order; else `max_eval_sequences` evenly spaced
        sequences, in order."""
        self._prepare()
        ds = self.data[split][task]
        if shuffle:
            sampler = EpochShuffleSampler(len(ds), seed)
        else:
            ds = eval_subset(ds, self.max_eval_sequences)
            sampler = eval_sampler(len(ds), self.trainer)
        return data_loader(
            ds,
            seed,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            drop_last=shuffle,
        )

    collate_fn = DomainCollate()
