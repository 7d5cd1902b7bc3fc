"""Retrieval lookup task: facts only in the database, neighbours from the retriever, and a
short run in which RETRO answers held-out queries that the same model without neighbours
cannot."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advarch.data.retro_lookup import EQ, RetroLookupDataModule
from advarch.models.model import Model

SMALL = dict(num_facts=512, num_values=16, seq_len=24, chunk_size=6, num_key_tokens=8,
             embedder_dim=128, num_train=1000, num_val=64, num_test=64, batch_size=16)  # fmt: skip


@pytest.fixture(scope="module")
def dm() -> RetroLookupDataModule:
    module = RetroLookupDataModule(**SMALL, num_neighbours=2)
    module.setup()
    return module


def asked(dm: RetroLookupDataModule, split: str) -> set[tuple[int, ...]]:
    """Keys a split's queries ask for."""
    ids, m = dm.splits[split].input_ids.numpy(), dm.chunk_size
    keys = ids.reshape(len(ids), -1, m)[:, :, 1:-1].reshape(-1, m - 2)
    return set(map(tuple, keys.tolist()))


def test_answers_are_at_eq_and_held_out_facts_are_never_trained(dm) -> None:
    batch = next(iter(dm.val_dataloader()))
    scored = batch["labels"] != -100
    assert torch.equal(scored, batch["input_ids"] == EQ)
    assert batch["neighbours"].shape == (16, 4, 2, 12)  # (B, L, K, 2m)
    assert not asked(dm, "train") & asked(dm, "val")
    assert not asked(dm, "train") & asked(dm, "test")


def test_neighbours_come_from_the_retriever_and_hold_the_answer(dm) -> None:
    batch = next(iter(dm.test_dataloader()))
    m = dm.chunk_size
    query_keys = batch["input_ids"].reshape(16, 4, m)[..., 1:-1]  # (B, L, m-2)
    top = batch["neighbours"][:, :, 0]  # (B, L, 2m) first neighbour: chunk + continuation
    assert torch.equal(top[..., 1 : m - 1], query_keys)  # the database chunk of the asked key
    answers = batch["labels"][:, m - 1 :: m]  # (B, L)
    assert torch.equal(top[..., m], answers)  # its continuation starts with the value
    assert min(dm.retrieval_hit.values()) > 0.99  # top-1 holds the asked fact
    # the second neighbour is another fact: the model must tell which one was asked for
    assert not torch.equal(batch["neighbours"][:, :, 1, 1 : m - 1], query_keys)


def test_bad_sizes_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match=r"data.seq_len=20 must be a positive multiple of"):
        RetroLookupDataModule(seq_len=20, chunk_size=6)
    with pytest.raises(
        ValueError,
        match=r"data.num_facts=100000 needs more distinct keys: raise data.num_key_tokens=4",
    ):
        RetroLookupDataModule(num_facts=100_000, num_key_tokens=4, chunk_size=8)


def answer_accuracy(model: Model, dm: RetroLookupDataModule, blank: bool) -> float:
    correct = total = 0
    with torch.no_grad():
        for batch in dm.val_dataloader():
            nb = torch.zeros_like(batch["neighbours"]) if blank else batch["neighbours"]
            pred = model(batch["input_ids"], neighbours=nb).logits.argmax(-1)
            scored = batch["labels"] != -100
            correct += int((pred == batch["labels"])[scored].sum())
            total += int(scored.sum())
    return correct / total


def test_retrieval_helps_on_held_out_queries() -> None:
    """80 steps: RETRO copies the retrieved value (K = 1); with padding neighbours the same
    weights are at chance (1/16), since no training query asked these facts."""
    torch.manual_seed(0)
    dm = RetroLookupDataModule(**{**SMALL, "seq_len": 36, "num_train": 1600}, num_neighbours=1)
    model = Model(dm.spec, dim=32, depth=2, num_heads=2, ffn_hidden=64, retro={"encoder_depth": 2})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = iter(dm.train_dataloader())
    for _ in range(80):
        batch = next(batches)
        logits = model(batch["input_ids"], neighbours=batch["neighbours"]).logits
        loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with_neighbours, padding = answer_accuracy(model, dm, False), answer_accuracy(model, dm, True)
    assert with_neighbours > 0.6, with_neighbours
    assert padding < 0.2, padding
    assert np.isfinite(loss.item())
