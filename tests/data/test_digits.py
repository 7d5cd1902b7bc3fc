"""Tests of the digits datamodules: shared split, permutations, rotations, continual contract."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from advarch.data.digits import (
    DigitsDataModule,
    PermutedDigitsDataModule,
    RotatedDigitsDataModule,
    SplitDigitsDataModule,
    digit_splits,
    encode_images,
    load_digit_arrays,
    rotate_images,
    rotated_digits,
    stratified_split,
    task_permutation,
)


def first_batch(loader) -> dict[str, torch.Tensor]:
    return next(iter(loader))


def all_rows(loader) -> dict[str, torch.Tensor]:
    """Concatenate every batch of a non-shuffled loader."""
    batches = list(loader)
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def test_split_is_disjoint_complete_stratified_and_reproducible():
    _, digits = load_digit_arrays()
    split = stratified_split(digits, seed=0)
    union = np.concatenate(list(split.values()))
    assert len(union) == len(set(union)) == len(digits) == 1797
    assert abs(len(split["train"]) / 1797 - 0.6) < 0.01
    for idx in split.values():  # every split has each digit in roughly its overall share
        share = np.bincount(digits[idx], minlength=10) / len(idx)
        assert np.allclose(share, np.bincount(digits) / len(digits), atol=0.01)
    again = stratified_split(digits, seed=0)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    assert not np.array_equal(split["train"], stratified_split(digits, seed=1)["train"])


@pytest.mark.parametrize("input_format", ["features", "tokens"])
def test_digits_subset_keeps_original_labels_and_ten_classes(input_format):
    dm = DigitsDataModule(classes=[3, 1], input_format=input_format, batch_size=16)
    dm.setup()
    dm.setup()  # idempotent
    assert dm.spec.num_classes == 10 and dm.spec.kind == "classification"
    rows = all_rows(dm.val_dataloader())
    assert set(rows["labels"].tolist()) == {1, 3}
    assert (rows["task"] == 0).all()
    batch = first_batch(dm.train_dataloader())
    if input_format == "features":
        assert dm.spec.num_features == 64 and dm.spec.vocab_size == 0
        assert batch["inputs"].dtype == torch.float32 and batch["inputs"].shape == (16, 64)
        assert batch["inputs"].min() >= 0.0 and batch["inputs"].max() <= 1.0
    else:
        assert (dm.spec.vocab_size, dm.spec.seq_len) == (17, 64)
        assert batch["inputs"].dtype == torch.long and batch["inputs"].max() <= 16


def test_permutations_fixed_per_task_and_distinct_across_tasks():
    perms = [task_permutation(0, t) for t in range(5)]
    assert all(np.array_equal(p, task_permutation(0, t)) for t, p in enumerate(perms))
    assert all(not np.array_equal(p, np.arange(64)) for p in perms)  # task 0 permuted too
    assert len({p.tobytes() for p in perms}) == 5
    assert not np.array_equal(perms[0], task_permutation(1, 0))


def test_permuted_task_inputs_are_the_permuted_images():
    dm = PermutedDigitsDataModule(num_tasks=3, input_format="tokens", batch_size=512)
    dm.setup()
    images, digits = digit_splits()["test"]
    plain = encode_images(images, "tokens")
    for t, loader in enumerate(dm.test_dataloader()):
        rows = all_rows(loader)
        assert np.array_equal(rows["inputs"].numpy(), plain[:, dm.permutations[t]])
        assert np.array_equal(rows["labels"].numpy(), digits)
        assert (rows["task"] == t).all()


@pytest.mark.parametrize(
    ("scenario", "num_classes", "task_labels"),
    [
        ("task", 2, lambda t: {0, 1}),
        ("domain", 2, lambda t: {0, 1}),
        ("class", 10, lambda t: {2 * t, 2 * t + 1}),
    ],
)
def test_split_digits_label_spaces(scenario, num_classes, task_labels):
    dm = SplitDigitsDataModule(num_tasks=5, scenario=scenario, batch_size=512)
    dm.setup()
    assert dm.spec.num_classes == num_classes and dm.spec.num_tasks == 5
    assert dm.spec.extras["scenario"] == scenario
    assert dm.spec.task_names[1] == "digits23"
    _, digits = digit_splits()["val"]
    for t, loader in enumerate(dm.val_dataloader()):
        rows = all_rows(loader)
        assert set(rows["labels"].tolist()) == task_labels(t)
        assert len(rows["labels"]) == np.isin(digits, [2 * t, 2 * t + 1]).sum()


def test_permuted_class_scenario_offsets_labels_by_task():
    dm = PermutedDigitsDataModule(num_tasks=3, scenario="class", batch_size=512)
    dm.setup()
    assert dm.spec.num_classes == 30
    for t, loader in enumerate(dm.val_dataloader()):
        assert set(all_rows(loader)["labels"].tolist()) == set(range(10 * t, 10 * t + 10))


def test_rotated_stream_rotates_back_to_the_original():
    dm = RotatedDigitsDataModule(input_format="tokens", batch_size=512)
    dm.setup()
    images, digits = digit_splits()["val"]
    for r, loader in enumerate(dm.val_dataloader()):
        rows = all_rows(loader)
        rotated = rows["inputs"].numpy().reshape(-1, 8, 8)
        assert np.array_equal(np.rot90(rotated, k=-r, axes=(1, 2)), images)
        assert np.array_equal(rows["labels"].numpy(), digits)
    assert dm.spec.task_names == ("rot0", "rot90", "rot180", "rot270")


def test_rotated_class_mapping():
    images, digits = load_digit_arrays()
    rot_images, classes = rotated_digits(images[:50], digits[:50])
    assert rot_images.shape == (200, 8, 8) and classes.max() < 40
    for i in range(200):
        rotation, digit = divmod(int(classes[i]), 10)
        assert digit == digits[i % 50]
        assert np.array_equal(np.rot90(rot_images[i], k=-rotation), images[i % 50])
    assert np.array_equal(rotate_images(images[:3], 1)[0], np.rot90(images[0]))


def test_continual_train_loader_follows_the_trainer_epoch():
    dm = PermutedDigitsDataModule(num_tasks=3, epochs_per_task=2, batch_size=8)
    dm.setup()
    assert dm.max_epochs == 6
    assert [dm.task_of_epoch(e) for e in range(8)] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert (first_batch(dm.train_dataloader())["task"] == 0).all()  # no trainer attached
    for epoch in range(8):
        dm.trainer = SimpleNamespace(current_epoch=epoch)  # a stand-in trainer
        assert (first_batch(dm.train_dataloader())["task"] == dm.task_of_epoch(epoch)).all()
    loaders = dm.val_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 3
    assert [int(first_batch(v)["task"][0]) for v in dm.test_dataloader()] == [0, 1, 2]


class _TaskRecorder(L.LightningModule):
    """Records the task of every training batch and which val loaders run."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.train_tasks: dict[int, set[int]] = {}
        self.val_loaders: set[int] = set()

    def training_step(self, batch, batch_idx):
        tasks = self.train_tasks.setdefault(self.current_epoch, set())
        tasks.update(batch["task"].tolist())
        return torch.nn.functional.cross_entropy(self.layer(batch["inputs"]), batch["labels"])

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        assert (batch["task"] == dataloader_idx).all()
        self.val_loaders.add(dataloader_idx)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_continual_contract_with_a_real_trainer():
    dm = SplitDigitsDataModule(num_tasks=5, epochs_per_task=2, scenario="class", batch_size=32)
    module = _TaskRecorder()
    trainer = L.Trainer(
        max_epochs=dm.max_epochs,
        reload_dataloaders_every_n_epochs=dm.epochs_per_task,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    assert module.train_tasks == {e: {e // 2} for e in range(10)}
    assert module.val_loaders == set(range(5))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SplitDigitsDataModule(num_tasks=3), "data.num_tasks=3"),
        (lambda: RotatedDigitsDataModule(num_tasks=5), "data.num_tasks=5"),
        (lambda: PermutedDigitsDataModule(scenario="online"), "data.scenario='online'"),
        (lambda: PermutedDigitsDataModule(epochs_per_task=0), "data.epochs_per_task=0"),
        (lambda: DigitsDataModule(input_format="pixels"), "data.input_format='pixels'"),
        (lambda: DigitsDataModule(classes=[3, 12]), "data.classes=[3, 12]"),
        (lambda: DigitsDataModule(batch_size=0), "data.batch_size=0"),
    ],
)
def test_invalid_config_names_the_key(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


DATA_CONFIGS = [
    "digits",
    "permuted_digits",
    "split_digits",
    "rotated_digits",
    "mmoe_synthetic",
    "fewshot_rotated_digits",
    "fewshot_synthetic",
]


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_data_config_instantiates_and_yields_a_batch(name):
    configs = Path(__file__).parents[2] / "advarch" / "configs"
    config = OmegaConf.load(configs / "data" / f"{name}.yaml")
    dm = instantiate(config)
    assert dm.spec.kind in ("classification", "regression")
    dm.setup()
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert set(batch) & {"inputs", "support"}
