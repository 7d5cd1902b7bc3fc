"""The text-domain stream: a deterministic grouping, per-domain splits, the stream contract."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from advarch.data.text_domains import (
    DEFAULT_DOMAINS,
    DOMAINS,
    TextDomainsDataModule,
    domain_files,
    domain_of,
)
from advarch.spec import TaskStream

SMALL = dict(max_documents=6, seq_len=32, batch_size=4, max_eval_sequences=4, steps_per_task=3)


def test_every_module_name_belongs_to_one_domain_and_defaults_are_large() -> None:
    names = [n for family in DOMAINS.values() for n in family]
    assert len(names) == len(set(names))
    files = domain_files(tuple(DOMAINS))
    assert all(len(files[d]) >= 20 for d in DEFAULT_DOMAINS)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert domain_of(root / "email" / "parser.py", root) == "net"
    assert domain_of(root / "encodings" / "cp1252.py", root) == "codecs"
    assert domain_of(root / "tkinter" / "__init__.py", root) is None
    again = domain_files(tuple(DOMAINS))
    assert again == files  # deterministic: sorted paths


@pytest.fixture
def stream(cache_dir: Path) -> TextDomainsDataModule:
    dm = TextDomainsDataModule(**SMALL, cache_dir=str(cache_dir))
    dm.setup()
    return dm


def test_splits_are_by_file_inside_each_domain(stream: TextDomainsDataModule) -> None:
    assert stream.domains == DEFAULT_DOMAINS and stream.num_tasks == 4
    seen: set[str] = set()
    for domain in stream.domains:
        info = stream.meta["domains"][domain]
        splits = [set(info[f"{s}_documents"]) for s in ("train", "val", "test")]
        assert all(splits) and sum(map(len, splits)) == len(set().union(*splits)) == 6
        assert seen.isdisjoint(set().union(*splits))  # a file belongs to one domain
        seen |= set().union(*splits)


def test_stream_contract_and_batches(stream: TextDomainsDataModule) -> None:
    assert isinstance(stream, TaskStream)
    spec = stream.spec
    assert spec.kind == "lm" and spec.task_names == DEFAULT_DOMAINS
    assert spec.extras["epochs_per_task"] == 1
    for split in ("train", "val", "test"):  # bits per byte per split and task
        assert len(spec.extras["task_bytes_per_token"][split]) == 4
        assert spec.bytes_per_token(split, 3) > 0 and spec.bytes_per_token(split) > 0
    assert stream.trainer_overrides == {
        "max_epochs": 4,
        "max_steps": -1,
        "reload_dataloaders_every_n_epochs": 1,
    }
    batches = list(stream.train_dataloader())  # no trainer: epoch 0, the first domain
    assert len(batches) == 3  # steps_per_task
    assert batches[0]["input_ids"].shape == (4, 32)
    assert (batches[0]["task"] == 0).all()
    assert (batches[0]["input_ids"][:, 1:] == batches[0]["labels"][:, :-1]).all()
    again = list(stream.train_dataloader())
    assert all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again, strict=True)
    )
    fisher = next(iter(stream.task_loader("train", 2, 4, True, seed=5)))  # e.g. EWC's samples
    assert (fisher["task"] == 2).all()
    val = stream.val_dataloader()
    assert len(val) == 4
    assert [int(next(iter(v))["task"][0]) for v in val] == [0, 1, 2, 3]
    joint = list(stream.joint_train_loader())
    assert len(joint) == 3 and len({int(t) for b in joint for t in b["task"]}) > 1


def test_bad_domain_names_one_line(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"data.domains=\['text', 'poetry'\]"):
        TextDomainsDataModule(domains=["text", "poetry"], cache_dir=str(cache_dir))
