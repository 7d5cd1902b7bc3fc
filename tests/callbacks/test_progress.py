"""The progress bar's epoch label in epoch- and step-budgeted runs, and its form in log files."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from advarch.callbacks.progress import LOG_WIDTH, StepBudgetProgressBar


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


def test_in_a_log_file_the_bar_is_wide_and_shows_no_logger_version(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    bar = StepBudgetProgressBar()
    assert bar._console_kwargs["width"] == LOG_WIDTH  # metrics on one line, not wrapped at 80
    logged = {"v_num": 0, "train/loss": 1.0}
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, trainer, module: logged)
    assert bar.get_metrics(None, None) == {"train/loss": 1.0}
