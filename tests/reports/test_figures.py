"""The report's figures: drawn when their data is there, skipped (None) when it is not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.image import imread

from advarch.reports.figures import (
    plot_expert_load_over_training,
    plot_fewshot,
    plot_learning_curves,
    plot_retrieval_by_quality,
    plot_sweep_curves,
)
from advarch.reports.run_folders import Metrics


def assert_png(path: Path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0.01  # something was drawn


def test_figures_are_drawn_from_their_data(tmp_path: Path) -> None:
    steps = np.arange(5.0)
    metrics = Metrics({"step": steps, "train/loss": 3 - steps, "val/acc": steps / 5})
    assert_png(plot_learning_curves(metrics, tmp_path / "curves.png", boundaries=[2.0]))
    load = np.random.default_rng(0).dirichlet(np.ones(4), size=(3, 2))  # (windows, layers, E)
    assert_png(
        plot_expert_load_over_training(np.array([1, 2, 3]), load, [0, 1], tmp_path / "l.png")
    )
    final = {"test/acc": 0.8, "test/acc_ci95": 0.05, "test/raw_proto_acc": 0.6}
    assert_png(plot_fewshot(final, tmp_path / "fewshot.png"))
    runs = {"0": metrics, "1": Metrics({"step": steps, "val/acc": steps / 4})}
    assert_png(plot_sweep_curves(runs, "val/acc", tmp_path / "sweep.png", {"0": "lr=1e-3"}))
    buckets = [{"min_shared": 0, "fraction": 0.6, "RETRO, neighbours": 2.0, "plain decoder": 2.5,
                "gain_vs_padding": 0.1}, {"min_shared": 32, "fraction": 0.4,
                "RETRO, neighbours": 1.0, "plain decoder": 2.4}]  # fmt: skip
    assert_png(plot_retrieval_by_quality(buckets, tmp_path / "quality.png"))


def test_figures_without_data_are_skipped(tmp_path: Path) -> None:
    empty = Metrics({"step": np.arange(3.0), "other": np.ones(3)})
    assert plot_learning_curves(empty, tmp_path / "curves.png") is None
    assert plot_fewshot({"test/acc": 0.9}, tmp_path / "fewshot.png") is None  # not few-shot
    assert plot_sweep_curves({"0": empty}, "val/acc", tmp_path / "sweep.png") is None
    no_chunks = [{"min_shared": 0, "fraction": 0.0}]
    assert plot_retrieval_by_quality(no_chunks, tmp_path / "quality.png") is None
    assert not list(tmp_path.iterdir())


def test_identical_series_are_one_line_named_by_both(tmp_path: Path, monkeypatch) -> None:
    # the learning rate of AdamW's two parameter groups drew two lines on top of each other
    import advarch.reports.figures as figures

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
    lr = np.array([1e-3, 2e-3, 1e-3])
    metrics = Metrics({"step": np.arange(3.0), "lr-AdamW/pg1": lr, "lr-AdamW/pg2": lr.copy(),
                       "train/loss": np.array([3.0, 2.0, 1.0])})  # fmt: skip
    plot_learning_curves(metrics, tmp_path / "curves.png")
    panel = next(ax for ax in drawn["fig"].axes if ax.get_title() == "learning rate")
    assert [line.get_label() for line in panel.get_lines()] == ["lr-AdamW/pg1 = lr-AdamW/pg2"]


def test_a_multitask_run_draws_its_tasks_and_their_gates(tmp_path: Path, monkeypatch) -> None:
    # (its report drew the total loss and the learning rate alone: new-user 36 F9)
    import advarch.reports.figures as figures

    drawn = {}
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.setdefault("fig", fig) and path)
    curve = np.array([3.0, 2.0, 1.0])
    per_task = {key: curve + i for i, key in enumerate(
        ["train/task_a/loss", "val/task_a/loss", "val/task_b/loss"])}  # fmt: skip
    stream = {"val/task_0/loss": curve}  # (a stream's numbered tasks: not in that panel)
    metrics = Metrics({"step": np.arange(3.0), "train/loss": curve, "val/gate_cosine": curve / 3,
                       **per_task, **stream})  # fmt: skip
    plot_learning_curves(metrics, tmp_path / "curves.png")
    panels = {ax.get_title(): [line.get_label() for line in ax.get_lines()]
              for ax in drawn["fig"].axes}  # fmt: skip
    assert panels["loss per task"] == ["train/task_a/loss", "val/task_a/loss", "val/task_b/loss"]
    assert panels["gate similarity between tasks (cosine)"] == ["val/gate_cosine"]
