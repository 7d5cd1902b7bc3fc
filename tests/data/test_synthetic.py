"""Tests for the synthetic sequence datamodules: shapes, seeds, label masks, solvability."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from advarch.data.synthetic import (
    AssociativeRecallDataModule,
    SelectiveCopyingDataModule,
    SequenceReversalDataModule,
)

SMALL = {"num_train": 64, "num_val": 16, "num_test": 16, "batch_size": 8}


def _columns(dm, split: str = "train") -> dict[str, torch.Tensor]:
    dm.setup()
    return dm.splits[split][:]


def solve_selective_copying(input_ids: torch.Tensor) -> list[list[int]]:
    """The data tokens (ids >= 2) of each row's context, in order."""
    return [[t for t in row.tolist() if t >= 2] for row in input_ids]


def solve_associative_recall(input_ids: torch.Tensor, num_pairs: int) -> list[dict[int, int]]:
    """For each row, {query position: value of the queried key} from the pair prefix."""
    answers = []
    for row in input_ids.tolist():
        table = dict(zip(row[0 : 2 * num_pairs : 2], row[1 : 2 * num_pairs : 2], strict=True))
        answers.append({i: table[t] for i, t in enumerate(row) if i >= 2 * num_pairs and t})
    return answers


def test_selective_copying_layout_and_solver():
    dm = SelectiveCopyingDataModule(seq_len=40, num_tokens_to_copy=6, vocab_size=10, **SMALL)
    cols = _columns(dm)
    ids, labels = cols["input_ids"], cols["labels"]
    assert ids.shape == labels.shape == (64, 40) and ids.dtype == torch.long
    assert (ids[:, -6:] == 1).all() and (ids[:, :-6] != 1).all()
    assert (labels[:, :-6] == -100).all() and (labels[:, -6:] >= 2).all()
    assert (ids < 10).all() and (ids >= 0).all()
    assert solve_selective_copying(ids) == labels[:, -6:].tolist()
    assert dm.spec.kind == "lm" and dm.spec.vocab_size == 10 and dm.spec.seq_len == 40


def test_associative_recall_layout_and_solver():
    dm = AssociativeRecallDataModule(seq_len=32, num_kv_pairs=5, num_queries=3, vocab_size=21,
                                     **SMALL)  # fmt: skip
    cols = _columns(dm)
    ids, labels = cols["input_ids"], cols["labels"]
    assert ids.shape == labels.shape == (64, 32)
    keys, values = ids[:, 0:10:2], ids[:, 1:10:2]
    assert ((keys >= 1) & (keys <= 10)).all() and ((values > 10) & (values < 21)).all()
    assert all(len(set(row)) == 5 for row in keys.tolist())  # distinct keys
    assert ((labels != -100).sum(1) == 3).all()
    for row, answers in enumerate(solve_associative_recall(ids, 5)):
        assert answers == {i: v for i, v in enumerate(labels[row].tolist()) if v != -100}
    assert dm.spec.kind == "lm" and dm.spec.vocab_size == 21


def test_reversal_batches_and_spec():
    dm = SequenceReversalDataModule(seq_len=7, vocab_size=9, **SMALL)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "decoder_input_ids", "labels"}
    assert all(t.shape == (8, 7) for t in batch.values())
    torch.testing.assert_close(batch["labels"], batch["input_ids"].flip(1))
    assert (batch["decoder_input_ids"][:, 0] == dm.spec.bos_id).all()
    torch.testing.assert_close(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])
    assert (dm.spec.kind, dm.spec.target_len, dm.spec.target_vocab_size) == ("seq2seq", 7, 9)


@pytest.mark.parametrize("cls", [SelectiveCopyingDataModule, AssociativeRecallDataModule,
                                 SequenceReversalDataModule])  # fmt: skip
def test_reproducible_per_seed_and_splits_differ(cls):
    first, again, other = (_columns(cls(seed=s, **SMALL)) for s in (0, 0, 1))
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert not torch.equal(first["input_ids"], other["input_ids"])
    val = _columns(cls(seed=0, **SMALL), "val")["input_ids"]
    assert not torch.equal(first["input_ids"][:16], val)


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (SelectiveCopyingDataModule, {"seq_len": 10, "num_tokens_to_copy": 6}, "data.seq_len=10"),
    (SelectiveCopyingDataModule, {"vocab_size": 2}, "data.vocab_size=2"),
    (AssociativeRecallDataModule, {"num_kv_pairs": 40, "vocab_size": 64}, "data.num_kv_pairs=40"),
    (AssociativeRecallDataModule, {"num_queries": 9}, "data.num_queries=9"),
    (SequenceReversalDataModule, {"num_train": 0}, "data.num_train=0"),
])  # fmt: skip
def test_invalid_arguments_name_the_key(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def _train_batch_at(dm, epoch: int) -> dict[str, torch.Tensor]:
    dm.trainer = SimpleNamespace(current_epoch=epoch)
    return next(iter(dm.train_dataloader()))


def test_curriculum_serves_each_stage_then_the_task(caplog):
    stages = [
        {"seq_len": 16, "num_tokens_to_copy": 2, "epochs": 2},
        {"seq_len": 24, "num_train": 8},
    ]
    dm = SelectiveCopyingDataModule(seq_len=40, num_tokens_to_copy=6, curriculum=stages, **SMALL)
    caplog.set_level("INFO", logger="advarch")
    assert dm.trainer_overrides == {"reload_dataloaders_every_n_epochs": 1}
    assert [dm.stage_of_epoch(e) for e in range(5)] == [0, 0, 1, None, None]
    expected = {0: (16, 2), 1: (16, 2), 2: (24, 6), 3: (40, 6), 7: (40, 6)}
    for epoch, (seq_len, copied) in expected.items():
        batch = _train_batch_at(dm, epoch)
        assert batch["input_ids"].shape == (8, seq_len)
        assert ((batch["labels"] != -100).sum(1) == copied).all()
        answers = solve_selective_copying(batch["input_ids"][:, :-copied])
        assert answers == batch["labels"][:, -copied:].tolist()
        assert len(dm._train_set(epoch)) == (8 if epoch == 2 else 64)
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape == (8, 40) and dm.spec.seq_len == 40
    # each stage said once, with its epochs and examples, and the task's own start (new user
    # 38 L10: a stage's epochs and num_train went unsaid, and nothing marked the task's start)
    assert [r.getMessage() for r in caplog.records] == [
        "curriculum stage 1/2 (epochs 0-1): seq_len=16 num_tokens_to_copy=2, 64 examples",
        "curriculum stage 2/2 (epoch 2): seq_len=24 num_tokens_to_copy=6, 8 examples",
        "curriculum done: from epoch 3 the task itself (seq_len=40 num_tokens_to_copy=6, 64 "
        "examples)",
    ]


def test_curriculum_is_reproducible_and_reshuffled_per_epoch():
    stages = [{"seq_len": 16, "num_tokens_to_copy": 2, "epochs": 2}]
    first, again = (SelectiveCopyingDataModule(curriculum=stages, **SMALL) for _ in range(2))
    epoch0, epoch1 = _train_batch_at(first, 0), _train_batch_at(first, 1)
    assert torch.equal(epoch0["input_ids"], _train_batch_at(again, 0)["input_ids"])
    assert not torch.equal(epoch0["input_ids"], epoch1["input_ids"])  # same stage, new order
    assert first._train_set(0) is first._train_set(1)  # one draw per stage, not per epoch
    without = SelectiveCopyingDataModule(**SMALL)
    assert without.trainer_overrides == {} and without.stage_of_epoch(0) is None


@pytest.mark.parametrize(("cls", "stage", "message"), [
    (SelectiveCopyingDataModule, {"seq_len": 512}, r"data.curriculum\[0\].seq_len=512 must be <="),
    (SelectiveCopyingDataModule, {"seq_len": 20}, r"data.curriculum\[0\].seq_len=20 must be >="),
    (SelectiveCopyingDataModule, {"vocab_size": 8}, r"data.curriculum\[0\].vocab_size is not"),
    (SelectiveCopyingDataModule, {"epochs": 0}, r"data.curriculum\[0\].epochs=0"),
    (SelectiveCopyingDataModule, {"num_train": 0}, r"data.curriculum\[0\].num_train=0"),
    (SelectiveCopyingDataModule, {"epochs": "two"}, r"data.curriculum\[0\]=.* must map option"),
    (SelectiveCopyingDataModule, 64, r"data.curriculum\[0\]=64 must map option"),
    (AssociativeRecallDataModule, {"num_queries": 9}, r"data.curriculum\[0\].num_queries=9"),
    (SequenceReversalDataModule, {"seq_len": 0}, r"data.curriculum\[0\].seq_len=0"),
])  # fmt: skip
def test_invalid_curriculum_names_the_stage_key(cls, stage, message):
    with pytest.raises(ValueError, match=message):
        cls(curriculum=[stage])
