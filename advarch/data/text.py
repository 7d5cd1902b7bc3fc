"""Language-model data: documents → train/val/test split by document → tokens → packed sequences.

Sources, in order of precedence: `files` (a glob of .txt/.md/.py/.jsonl/.json/.parquet files),
`dataset` (a Hugging Face Hub name; fails fast offline), or the default embedded corpus: the
running interpreter's own standard-library sources (~11 MB of real text, no download).
Tokenised, packed splits are cached with `datasets` (memory-mapped Arrow) under `cache_dir`,
keyed by a fingerprint of the sources and options, so the second run starts in seconds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from advarch.data.sampling import EpochShuffleSampler, batches_done_this_epoch
from advarch.data.tokenizer import BPETokenizer, ByteTokenizer
from advarch.spec import DataSpec

SPLITS = ("train", "val", "test")
STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".text"}


def stdlib_files() -> list[Path]:
    """The interpreter's standard-library .py files, without tests and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py") if not STDLIB_SKIP & set(f.relative_to(root).parts))


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
    lines = read_text_file(path).splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"data.files: {path}:{number}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(
                f"data.files: {path}:{number}: no string field {field!r} (data.text_field)"
            )
        texts.append(row[field])
    if not texts:
        raise ValueError(f"data.files: {path} holds no JSON lines")
    return texts


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
    return {
        "val": order[:n_val],
        "test": order[n_val : n_val + n_test],
        "train": order[n_val + n_test :],
    }


class TextDataModule(L.LightningDataModule):
    """Packed next-token prediction over a text corpus (see the module docstring)."""

    def __init__(
        self,
        files: str | None = None,
        dataset: str | None = None,
        text_field: str = "text",
        tokenizer: str = "byte",
        bpe_vocab_size: int = 4096,
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
        if tokenizer not in ("byte", "bpe"):
            raise ValueError(f"data.tokenizer={tokenizer!r} is not one of: byte, bpe")
        if seq_len < 2:
            raise ValueError(f"data.seq_len={seq_len} must be at least 2")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be positive")
        if files is not None and not glob.glob(os.path.expanduser(files), recursive=True):
            raise FileNotFoundError(f"data.files={files!r} matches no file")
        self.files, self.dataset_name, self.text_field = files, dataset, text_field
        self.tokenizer_kind, self.bpe_vocab_size = tokenizer, bpe_vocab_size
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.max_documents, self.max_eval_sequences = max_documents, max_eval_sequences
        self.cache_root = Path(cache_dir)
        self.retrieval_cfg = dict(retrieval or {})
        self.dedupe = dedupe
        self.splits: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.tokenizer: ByteTokenizer | BPETokenizer | None = None
        self.retriever = None

    # -- sources ------------------------------------------------------------------------------
    def _documents(self) -> tuple[list[str], list[str]]:
        """(names, texts) of every document of the source."""
        if self.files is not None:
            return self._local_documents(
                sorted(glob.glob(os.path.expanduser(self.files), recursive=True))
            )
        if self.dataset_name is not None:
            return self._hub_documents()
        paths = stdlib_files()
        return [str(p) for p in paths], [
            p.read_text(encoding="utf-8", errors="replace") for p in paths
        ]

    def _local_documents(self, paths: list[str]) -> tuple[list[str], list[str]]:
        import datasets

        names: list[str] = []
        texts: list[str] = []
        for path in paths:
            suffix = Path(path).suffix.lower()
            if suffix in TEXT_SUFFIXES:
                names.append(path)
                texts.append(read_text_file(path))
                continue
            if suffix == ".jsonl":
                rows = read_jsonl(path, self.text_field)
                texts += rows
                names += [f"{path}#{i}" for i in range(len(rows))]
                continue
            builder = {".json": "json", ".parquet": "parquet"}.get(suffix)
            if builder is None:
                raise ValueError(
                    f"data.files: cannot read {path!r} (use text, JSON lines or parquet)"
                )
            try:
                ds = datasets.load_dataset(builder, data_files=path, split="train")
            except Exception as err:  # pyarrow / datasets errors: name the file, one line
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
                raise ValueError(f"data.files: cannot read {path}: {reason}") from err
            if self.text_field not in ds.column_names:
                raise ValueError(
                    f"data.text_field={self.text_field!r} is not a column of {path!r} "
                    f"(columns: {', '.join(ds.column_names)})"
                )
            texts += ds[self.text_field]
            names += [f"{path}#{i}" for i in range(len(ds))]
        return names, texts

    def _hub_documents(self) -> tuple[list[str], list[str]]:
        if not hub_reachable():
            raise ConnectionError(
                f"data.dataset={self.dataset_name!r} needs the Hugging Face Hub, which is "
                "unreachable (offline); use data.files=<glob> for local files"
            )
        import datasets

        ds = datasets.load_dataset(self.dataset_name, split="train")
        if self.text_field not in ds.column_names:
            raise ValueError(
                f"data.text_field={self.text_field!r} is not a column of {self.dataset_name}"
            )
        return [f"{self.dataset_name}#{i}" for i in range(len(ds))], ds[self.text_field]

    def _fingerprint(self) -> str:
        if self.files is not None:
            paths = sorted(glob.glob(os.path.expanduser(self.files), recursive=True))
            source = [(p, os.path.getsize(p), os.path.getmtime(p)) for p in paths]
        elif self.dataset_name is not None:
            source = [self.dataset_name]
        else:
            source = [(str(p), p.stat().st_size) for p in stdlib_files()]
        options = [
            self.tokenizer_kind,
            self.bpe_vocab_size,
            self.seq_len,
            self.val_fraction,
            self.test_fraction,
            self.max_documents,
            self.seed,
            self.text_field,
            2,
            *(["dedupe"] if self.dedupe else []),  # keeps earlier caches' keys
        ]
        return hashlib.sha256(json.dumps([source, options]).encode()).hexdigest()[:16]

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

        cache = self.cache_root / f"text-{self._fingerprint()}"
        self.meta = load_or_build(cache, self._build)
        self.tokenizer = load_tokenizer(self.tokenizer_kind, cache)
        self.splits = {
            s: datasets.load_from_disk(str(cache / s)).with_format("torch") for s in SPLITS
        }
        self.cache_dir = cache
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
        parts = split_documents(len(texts), self.val_fraction, self.test_fraction, self.seed)
        train_texts = [texts[i] for i in parts["train"]]
        tok = train_tokenizer(self.tokenizer_kind, train_texts, self.bpe_vocab_size, tmp)
        meta: dict[str, Any] = {**token_ids(tok), "documents": {}}
        streams = {}
        for split in SPLITS:
            docs = [texts[i] for i in parts[split]]
            tokens, doc_ids = pack_documents(
                tok, docs, parts[split], self.seq_len, tmp / split, f"{split} split"
            )
            meta["documents"][split] = [names[i] for i in parts[split]]
            meta[f"{split}_tokens"] = int(len(tokens))
            meta[f"{split}_bytes"] = int(sum(len(d.encode("utf-8")) for d in docs))
            streams[split] = tokens
            np.save(tmp / f"{split}_tokens.npy", tokens)
            np.save(tmp / f"{split}_docs.npy", doc_ids)
        meta["unigram_bpb"] = unigram_bits_per_byte(
            streams["train"], streams["val"], tok.vocab_size, meta["val_bytes"]
        )
        return meta

    def _attach_retrieval(self, cache: Path) -> None:
        from advarch.data.retro_neighbours import NeighbourLookup

        self.retriever = NeighbourLookup.build(self, cache, **self.retrieval_cfg)

    # -- contract -----------------------------------------------------------------------------
    @property
    def spec(self) -> DataSpec:
        self._prepare()
        r = self.retriever
        return DataSpec(
            kind="lm",
            vocab_size=self.meta["vocab_size"],
            seq_len=self.seq_len,
            pad_id=self.meta["pad_id"],
            eos_id=self.meta["eos_id"],
            bos_id=self.meta["bos_id"],
            retrieval_neighbours=r.k if r else 0,
            retrieval_chunk=r.chunk_size if r else 64,
            retrieval_neighbour_len=r.neighbour_len if r else 128,
            extras={
                "bytes_per_token": self.bytes_per_token("val"),
                "unigram_bpb": self.meta["unigram_bpb"],
                "tokenizer": self.tokenizer_kind,
            },
        )

    def bytes_per_token(self, split: str) -> float:
        return self.meta[f"{split}_bytes"] / self.meta[f"{split}_tokens"]

    def _eval_subset(self, split: str):
        return eval_subset(self.splits[split], self.max_eval_sequences)

    def _loader(self, ds, shuffle: bool, split: str) -> DataLoader:
        sampler = None
        if shuffle:
            skip = batches_done_this_epoch(self.trainer) * self.batch_size
            sampler = EpochShuffleSampler(len(ds), self.seed, skip=skip)
        return DataLoader(
            ds,
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


def load_or_build(cache: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """The meta.json of a cache folder; when it is missing, `build(tmp)` fills a temporary
    folder and returns the meta, and the folder is moved into place atomically."""
    if not (cache / "meta.json").exists():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "meta.json").write_text(json.dumps(build(tmp)))
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return json.loads((cache / "meta.json").read_text())


def train_tokenizer(
    kind: str, texts: list[str], bpe_vocab_size: int, folder: Path
) -> ByteTokenizer | BPETokenizer:
    """The byte tokenizer, or a BPE trained on `texts` and saved as `folder/bpe.json`."""
    if kind == "bpe":
        return BPETokenizer.train(texts, bpe_vocab_size, folder / "bpe.json")
    return ByteTokenizer()


def load_tokenizer(kind: str, folder: Path) -> ByteTokenizer | BPETokenizer:
    """The tokenizer `train_tokenizer` made for a cache folder."""
    return BPETokenizer(folder / "bpe.json") if kind == "bpe" else ByteTokenizer()


def token_ids(tok: ByteTokenizer | BPETokenizer) -> dict[str, int]:
    """The meta fields every tokenised cache records: vocabulary size and special ids."""
    return {
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
        "bos_id": tok.bos_id,
    }


def eval_subset(ds: Any, n: int | None) -> Any:
    """`n` evenly spaced rows of a dataset (all of it when n is None or larger)."""
    if n is None or n >= len(ds):
        return ds
    return ds.select(np.linspace(0, len(ds) - 1, n).round().astype(int).tolist())


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
        ValueError: naming `data.seq_len` when the documents hold fewer than seq_len+1 tokens.
    """
    import datasets
    import pyarrow as pa

    encoded = tok.encode_batch(docs)
    tokens = np.concatenate([np.append(e, tok.eos_id) for e in encoded]).astype(np.int32)
    doc_ids = np.repeat(doc_index, [len(e) + 1 for e in encoded]).astype(np.int32)
    n_seq = (len(tokens) - 1) // seq_len
    if n_seq < 1:
        raise ValueError(
            f"data: the {label} has {len(tokens)} tokens, fewer than "
            f"data.seq_len={seq_len}+1; add documents or shorten seq_len"
        )
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


def unigram_bits_per_byte(
    train: np.ndarray, val: np.ndarray, vocab_size: int, val_bytes: int
) -> float:
    """Cross-entropy of val under the add-one unigram distribution of train, in bits per byte."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    log2p = np.log2(counts / counts.sum())
    return float(-log2p[val].sum() / val_bytes)
