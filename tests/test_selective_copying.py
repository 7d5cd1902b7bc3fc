"""experiment=selective_copying(_lti): the configs compose, validate, train a few steps through
the real entry point and report the final weights' answer-token loss and accuracy (selective
beating LTI is tested at block level: tests/models/blocks/test_ssm.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from advarch.data.synthetic import IGNORE, SelectiveCopyingDataModule
from advarch.pipeline import build_model
from advarch.train import run
from tests.conftest import final_module, first_batches

SMALL = [
    "data.seq_len=24",
    "data.num_tokens_to_copy=4",
    "data.curriculum=[{seq_len: 12, num_train: 32}]",  # 2 steps, then the task
    "data.num_train=64",
    "data.num_val=32",
    "data.num_test=32",
    "data.batch_size=16",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "callbacks=none",
]


@pytest.mark.parametrize(
    ("experiment", "selective"), [("selective_copying", True), ("selective_copying_lti", False)]
)
def test_experiment_is_the_issue_size_with_a_valid_curriculum(make_cfg, experiment, selective):
    cfg = make_cfg([f"experiment={experiment}"])
    assert (cfg.data.seq_len, cfg.data.num_tokens_to_copy, cfg.data.vocab_size) == (256, 16, 16)
    datamodule = instantiate(cfg.data)  # checks every stage
    assert datamodule.stage_of_epoch(len(cfg.data.curriculum)) is None
    assert cfg.model.ssm.selective is selective


@pytest.mark.parametrize(
    ("experiment", "selective"), [("selective_copying", True), ("selective_copying_lti", False)]
)
def test_experiment_trains_and_reports_answer_accuracy(make_cfg, experiment, selective):
    cfg = make_cfg([f"experiment={experiment}", *SMALL])
    assert cfg.model.depth == 2 and list(cfg.model.layers) == ["ssm"]
    assert cfg.model.ssm.selective is selective
    model = build_model(cfg, instantiate(cfg.data).spec)
    mixers = [m for m in model.modules() if type(m).__name__ == "SelectiveSSM"]
    assert len(mixers) == 2 and all(m.selective is selective for m in mixers)
    metrics = run(cfg)
    loss, accuracy = answer_metrics(cfg, "val")
    assert metrics["val/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)


def answer_metrics(cfg, split: str) -> tuple[float, float]:
    """Cross-entropy and accuracy of the run's final checkpoint on the answer tokens (labels
    other than IGNORE) of the whole split: what val/acc and test/acc claim to be."""
    module = final_module(cfg)
    batches = first_batches(cfg, split, cfg.data[f"num_{split}"])
    with torch.no_grad():
        logits = torch.cat([module(b).logits for b in batches]).flatten(0, 1)  # (N·T, V)
    labels = torch.cat([b["labels"] for b in batches]).flatten()
    answers = labels != IGNORE
    assert answers.sum() == cfg.data[f"num_{split}"] * cfg.data.num_tokens_to_copy
    loss = F.cross_entropy(logits[answers], labels[answers]).item()
    return loss, (logits[answers].argmax(-1) == labels[answers]).float().mean().item()


def test_curriculum_runs_its_stages_through_the_trainer(make_cfg, monkeypatch):
    served: list[tuple[int, int]] = []  # (epoch, sequence length of the train loader)
    original = SelectiveCopyingDataModule.train_dataloader

    def spy(self):
        loader = original(self)
        served.append((self.trainer.current_epoch, loader.dataset[0]["input_ids"].shape[0]))
        return loader

    monkeypatch.setattr(SelectiveCopyingDataModule, "train_dataloader", spy)
    stages = "[{seq_len: 8, num_tokens_to_copy: 2}, {seq_len: 16, epochs: 2}]"
    cfg = make_cfg(["experiment=selective_copying", *SMALL, "trainer.max_steps=20",
                    f"data.curriculum={stages}"])  # fmt: skip
    metrics = run(cfg)  # 4 steps per epoch: stage 1, stage 2 twice, then the task twice
    assert served == [(0, 8), (1, 16), (2, 16), (3, 24), (4, 24)]
    assert metrics["test/acc"] == pytest.approx(answer_metrics(cfg, "test")[1], abs=1e-6)
