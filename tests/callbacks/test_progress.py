"""The progress bar's epoch label in epoch- and step-budgeted runs, and its form in log files."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import RichProgressBar

from advarch.callbacks.progress import StepBudgetProgressBar
from advarch.console_log import LOG_WIDTH


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


def test_a_step_budget_over_several_epochs_is_one_bar_to_its_end(tmp_path) -> None:
    # (the bar and its time left counted to the end of each epoch: 4 minutes left shown for 8)
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    bar = StepBudgetProgressBar()
    counts, totals = [], []
    update, add_task = bar._update, bar._add_task
    bar._add_task = lambda total, *a, **k: (totals.append(total), add_task(total, *a, **k))[1]

    def _update(task_id, current, *args, **kwargs) -> None:
        if task_id == bar.train_progress_bar_id:
            counts.append(current)
        update(task_id, current, *args, **kwargs)

    bar._update = _update
    trainer = L.Trainer(
        max_steps=7,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert totals[0] == 7 and counts == list(range(1, 8))  # epochs of 3, 3 and 1 batches


def test_in_a_log_file_every_tenth_of_the_run_is_a_progress_line(tmp_path, monkeypatch,
                                                                  caplog) -> None:  # fmt: skip
    # (Rich draws only a final frame there: a log followed with tail -f looked dead for a run)
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    trainer = L.Trainer(max_steps=60, limit_train_batches=8, limit_val_batches=0,
                        accumulate_grad_batches=2, callbacks=[StepBudgetProgressBar()],
                        logger=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)  # fmt: skip
    with caplog.at_level("INFO", logger="advarch"):
        trainer.fit(BoringModel())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(" · ")[0] for line in lines] == [f"step {s}/60" for s in range(6, 61, 6)]
    assert lines[-1].split(" · ")[1].endswith("elapsed, 0:00:00 left")
