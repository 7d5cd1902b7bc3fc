"""The progress bar's epoch label in epoch- and step-budgeted runs, and its form in log files."""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.demos.boring_classes import BoringModel

from advarch.callbacks.progress import StepBudgetProgressBar
from advarch.spec import TaskSchedule


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


FEWSHOT_BAR = ("train/loss", "val/loss", "val/acc", "val/acc_ci95", "val/raw_proto_acc",
               "val/raw_proto_acc_ci95", "val/a_long_metric", "val/another_long_one")  # fmt: skip


class ManyMetrics(BoringModel):
    """Shows more metrics on the bar than fit in 200 columns (a few-shot run's, and more)."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        for name in FEWSHOT_BAR:
            self.log(name, 0.118, prog_bar=True)
        return out


def test_in_a_log_file_the_bar_is_one_line_whatever_its_metrics(tmp_path, capsys) -> None:
    # (at a fixed width the last metrics wrapped onto a line of their own, padded with spaces)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, callbacks=[StepBudgetProgressBar()],
                        logger=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(ManyMetrics())
    out = capsys.readouterr().out  # (not a terminal)
    (bar,) = [line for line in out.splitlines() if line.startswith("Epoch")]
    assert all(f"{name}: 0.118" in bar for name in FEWSHOT_BAR) and bar == bar.rstrip()
    assert out.count("val/raw_proto_acc_ci95") == 1  # on the bar's line alone


def test_the_bar_shows_no_logger_version(monkeypatch) -> None:
    logged = {"v_num": 0, "train/loss": 1.0}
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, trainer, module: logged)
    assert StepBudgetProgressBar().get_metrics(None, None) == {"train/loss": 1.0}


@pytest.mark.parametrize(("max_steps", "accumulate", "batches"), [(7, 1, 7), (6, 2, 9), (5, 2, 8)])
def test_a_step_budget_over_several_epochs_is_one_bar_to_its_end(
    tmp_path, max_steps: int, accumulate: int, batches: int
) -> None:
    # (the bar and its time left counted to the end of each epoch: 4 minutes left shown for 8);
    # new user 40b: accumulating 2 batches a step over epochs of 3, the bar ended at 9/12 (each
    # epoch's odd last batch steps too: 6 steps take 9 batches)
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
        max_steps=max_steps,
        limit_train_batches=3,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert trainer.global_step == max_steps
    assert totals[0] == batches and counts == list(range(1, batches + 1))  # (7: 3, 3 and 1)


def test_in_a_log_file_every_tenth_of_the_run_is_a_progress_line(tmp_path, monkeypatch,
                                                                  caplog) -> None:  # fmt: skip
    # (Rich draws only a final frame there: a log followed with tail -f looked dead for a run)
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


def at_step_6_of_60(is_global_zero: bool = True) -> SimpleNamespace:
    """A trainer at the end of optimizer step 6 of 60 (a progress line is due)."""
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(total_batch_idx=5))
    return SimpleNamespace(estimated_stepping_batches=60, global_step=6, max_steps=60,
                           max_epochs=-1, accumulate_grad_batches=1, callback_metrics={},
                           num_training_batches=float("inf"),
                           is_global_zero=is_global_zero, fit_loop=loop)  # fmt: skip


def logged_progress(trainers: list[SimpleNamespace], label: str | None, caplog) -> list[str]:
    """The progress lines each trainer's own bar logs at its batch end (a log file)."""
    for trainer in trainers:
        bar = StepBudgetProgressBar()
        bar._started, bar.run_label, bar._trainer = (0.0, 0), label, trainer
        with caplog.at_level("INFO", logger="advarch"):
            bar.on_train_batch_end(trainer, None, None, None, 5)
    return [r.getMessage() for r in caplog.records]


def test_only_the_first_ddp_process_logs_progress_lines(monkeypatch, caplog) -> None:
    # (every process of `trainer=ddp_sim` logged its own, with its own loss: twice the lines)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda *args: None)
    lines = logged_progress([at_step_6_of_60(False), at_step_6_of_60()], None, caplog)
    assert [line.split(" · ")[0] for line in lines] == ["step 6/60"]


def test_a_sweep_trials_progress_lines_name_it(monkeypatch, caplog) -> None:
    # (a parallel sweep's trials log into one console: their lines read alike)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    monkeypatch.setattr(RichProgressBar, "on_train_batch_end", lambda *args: None)
    (line,) = logged_progress([at_step_6_of_60()], "trial 1 (model.depth=2)", caplog)
    assert line.startswith("trial 1 (model.depth=2) · step 6/60 · ")


class TwoTaskStream:
    """The parts of a `TaskStream` the bar reads: 2 tasks of 3 epochs each."""

    schedule = TaskSchedule(num_tasks=2, epochs_per_task=3)
    seed, trainer_overrides, joint = 0, {}, False
    spec = SimpleNamespace(task_names=("perm0", "perm1"))

    def task_loader(self, *args: Any) -> None: ...

    def val_dataloader(self) -> None: ...

    def train_jointly(self, joint: bool) -> None: ...


@pytest.mark.parametrize(("epoch", "joint", "label"), [
    (0, False, "task 1/2 (perm0) · Epoch 0/5"),
    (4, False, "task 2/2 (perm1) · Epoch 4/5"),
    (4, True, "Epoch 4/5"),  # (all tasks at once: strategy.joint=true)
])  # fmt: skip
def test_a_stream_shows_the_task_of_the_epoch(epoch: int, joint: bool, label: str) -> None:
    # (`Epoch 7/49` all through 5 tasks: nothing said which task trained)
    bar, stream = StepBudgetProgressBar(), TwoTaskStream()
    stream.joint = joint
    bar._trainer = SimpleNamespace(max_epochs=6, max_steps=-1, datamodule=stream)
    assert bar._get_train_description(epoch).strip() == label


# review 36: a trial's label is its overrides as typed; a dict or interpolation override holds
# braces, which `TextColumn` reads as a format field (KeyError: 'num_experts' at the first
# render: the trial fails)
@pytest.mark.parametrize("label", [
    "trial 0 (+model.moe={num_experts:4})",
    "trial 1 (model.ffn_hidden=${model.dim})",
    "trial 2 (model.layers=[attn,ssm])",
])  # fmt: skip
def test_a_trial_label_renders_as_typed(label: str) -> None:
    from rich.console import Console
    from rich.progress import Progress

    bar = StepBudgetProgressBar()
    bar.run_label = label
    progress = Progress(*bar.configure_columns(SimpleNamespace()))
    progress.add_task("Epoch 0", total=10)
    console = Console(width=200, record=True)
    console.print(progress.get_renderable())
    assert label in console.export_text()
