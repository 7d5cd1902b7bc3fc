"""Bits per byte are the nats of the target tokens scored over those tokens' UTF-8 bytes.

Only a subset of a split is scored (`data.max_eval_sequences`, `trainer.limit_*_batches`), and
with BPE its bytes per token differ from the whole split's: bpb once divided by the split's
ratio (printed 3.376 where the scored text gave 3.299). A uniform model scores ln V nats per
token, so the exact value, n·ln V / ln 2 / Σ bytes, is known by hand for whatever is scored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from advarch.data.text import TextDataModule
from advarch.data.text_domains import TextDomainsDataModule
from advarch.models.output import ModelOutput
from advarch.strategies.base import BaseStrategy
from advarch.strategies.continual import ContinualStrategy

# Documents that compress very differently: repeated words (many bytes per BPE token) or
# random letters (about one), so a few scored sequences are far from the split's ratio.
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def corpus(folder: Path, extra: str = "") -> str:
    """A glob of 24 documents of both kinds (`extra` appended to each: non-ASCII text)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(24):
        if i % 2:
            text = "".join(rng.choice(list("qxzjvkwy "), 600))
        else:
            text = " ".join(rng.choice(WORDS, 150))
        (folder / f"d{i:02d}.txt").write_text(text + extra, encoding="utf-8")
    return str(folder / "*")


class UniformLM(nn.Module):
    """Equal logits over the vocabulary: ln V nats for every target token."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, inputs: torch.Tensor, **kwargs: Any) -> ModelOutput:
        logits = torch.zeros(*inputs.shape, self.vocab_size)
        return ModelOutput(logits=logits, aux_loss=torch.zeros(()))


def trainer(**limits: Any) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                     enable_checkpointing=False, **limits)  # fmt: skip


def exact_bpb(labels: list[torch.Tensor], token_bytes: list[int], vocab_size: int) -> float:
    """n · ln V nats over the UTF-8 bytes of the n target tokens of `labels`."""
    targets = torch.cat([t.flatten() for t in labels])
    scored_bytes = sum(token_bytes[i] for i in targets.tolist())
    return targets.numel() * math.log(vocab_size) / math.log(2) / scored_bytes


def test_each_token_ids_bytes_add_up_to_each_splits_utf8_bytes(tmp_path: Path) -> None:
    """The table counts what the unigram baseline divides by: the documents' UTF-8 bytes
    (<eos> none), for BPE and bytes alike, with characters of two to four bytes."""
    files = corpus(tmp_path / "corpus", extra=" café — 漢字 😀")
    for kind in ("bpe", "byte"):
        dm = TextDataModule(files=files, tokenizer=kind, bpe_vocab_size=320, seq_len=32,
                            cache_dir=str(tmp_path / "cache"))  # fmt: skip
        table = np.asarray(dm.spec.token_bytes)
        for split in ("train", "val", "test"):
            stream = np.load(dm.cache_dir / f"{split}_tokens.npy")
            assert table[stream].sum() == dm.meta[f"{split}_bytes"]


def test_text_bits_per_byte_count_the_bytes_of_the_sequences_scored(tmp_path: Path) -> None:
    dm = TextDataModule(files=corpus(tmp_path / "corpus"), tokenizer="bpe", bpe_vocab_size=320,
                        seq_len=32, batch_size=2, max_eval_sequences=5,
                        cache_dir=str(tmp_path / "cache"))  # fmt: skip
    spec = dm.spec
    module = BaseStrategy(UniformLM(spec.vocab_size), spec)
    metrics = trainer(limit_test_batches=2).test(module, datamodule=dm, verbose=False)[0]
    labels = [b["labels"] for b in list(dm.test_dataloader())[:2]]
    want = exact_bpb(labels, spec.token_bytes, spec.vocab_size)
    # by hand again: the scored text is ASCII, every byte of it a character
    text = sum(len(dm.tokenizer.decode(t.flatten().tolist())) for t in labels)
    assert want == pytest.approx(sum(t.numel() for t in labels) * math.log2(spec.vocab_size) / text)
    assert metrics["test/bpb"] == pytest.approx(want, rel=1e-5)
    split_ratio = math.log2(spec.vocab_size) / spec.bytes_per_token("test")
    assert abs(split_ratio / want - 1) > 1e-3  # (the whole split's ratio is off)
    # the unigram baseline on the same tokens: the add-one unigram of the training targets
    # (it was the whole validation split's, 5.6% from the scored text's in a debug run)
    train = np.concatenate([r["tokens"][1:].numpy() for r in dm.splits["train"]])
    counts = np.bincount(train, minlength=spec.vocab_size) + 1.0
    targets = torch.cat([t.flatten() for t in labels]).numpy()
    bits = -np.log2(counts / counts.sum())[targets].sum()
    scored_bytes = sum(spec.token_bytes[i] for i in targets)
    assert metrics["test/unigram_bpb"] == pytest.approx(bits / scored_bytes, rel=1e-5)
    assert (dm.cache_dir / "train_unigram_counts.npy").is_file()  # (counted once a cache)


def test_domain_bits_per_byte_per_domain_pooled_and_in_the_matrix(cache_dir: Path) -> None:
    dm = TextDomainsDataModule(max_documents=6, seq_len=32, batch_size=2, max_eval_sequences=3,
                               tokenizer="bpe", bpe_vocab_size=300,
                               cache_dir=str(cache_dir))  # fmt: skip
    spec = dm.spec
    V = spec.vocab_size
    module = ContinualStrategy(UniformLM(V), spec)
    run = trainer(limit_test_batches=1, limit_val_batches=1)
    metrics = run.test(module, datamodule=dm, verbose=False)[0]
    labels = {
        split: [next(iter(dm.task_loader(split, j, 2, False, 0)))["labels"] for j in range(4)]
        for split in ("val", "test")
    }
    per_domain = [exact_bpb([t], spec.token_bytes, V) for t in labels["test"]]
    for j, want in enumerate(per_domain):
        assert metrics[f"test/task_{j}/bpb"] == pytest.approx(want, rel=1e-5)
    assert metrics["test/avg_bpb"] == pytest.approx(np.mean(per_domain), rel=1e-5)
    pooled = exact_bpb(labels["test"], spec.token_bytes, V)  # Σ nats / Σ bytes of all domains
    assert metrics["test/bpb"] == pytest.approx(pooled, rel=1e-5)
    assert 0 < metrics["test/task_0/unigram_bpb"] < metrics["test/task_0/bpb"]  # (uniform)
    matrix_row = [exact_bpb([t], spec.token_bytes, V) for t in labels["val"]]
    torch.testing.assert_close(module.evaluate_tasks(), torch.tensor(matrix_row))
    # a stream resumed from a checkpoint measured over each split's bytes per token goes on
    # so: one definition in one matrix (its rows were 4.574 … where exact ones are 4.686 …)
    old = {"continual": {"accuracy_matrix": module.accuracy_matrix,
                         "initial_accuracy": module.initial_accuracy, "finished_tasks": 0},
           "hyper_parameters": {"spec": {"extras": {}}}}  # fmt: skip
    module.on_load_checkpoint(old)
    split_ratio = [math.log2(V) / spec.bytes_per_token("val", j) for j in range(4)]
    torch.testing.assert_close(module.evaluate_tasks(), torch.tensor(split_ratio))


def test_an_epoch_resumed_from_a_state_without_bytes_still_scores_bits_per_byte() -> None:
    """A checkpoint written before the byte table saved the loss alone: the resumed epoch
    divides by the bytes of the batches it scored itself, never by a zero count."""
    from advarch.spec import DataSpec
    from advarch.strategies.objectives import Objective, load_metrics_state

    spec = DataSpec(kind="lm", vocab_size=3, seq_len=2, extras={"token_bytes": [1, 4, 0]})
    objective = Objective(spec)
    old = {"tensors": {"mean_value": torch.tensor(6.0), "weight": torch.tensor(3.0)},
           "updates": 1}  # fmt: skip
    load_metrics_state(objective.training_metrics(), {"loss": old})
    nats, preds = torch.tensor(2.0), torch.zeros(2, 3)
    objective.update("train", nats, preds, torch.tensor([1, 2]), 2)  # 4 bytes in 2 tokens
    assert objective.compute("train")["bpb"].item() == pytest.approx(2.0 / math.log(2) / 2.0)
