"""The progress bar's epoch label in epoch- and step-budgeted runs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from advarch.callbacks.progress import StepBudgetProgressBar


@pytest.mark.parametrize(("max_epochs", "max_steps", "label"), [
    (10, -1, "Epoch 3/9"),
    (-1, 8000, "Epoch 3 · max_steps 8000"),
    (None, 8000, "Epoch 3 · max_steps 8000"),
    (-1, -1, "Epoch 3"),
])  # fmt: skip
def test_label_never_shows_a_negative_epoch_budget(max_epochs, max_steps, label):
    bar = StepBudgetProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps)
    assert bar._get_train_description(3).strip() == label
