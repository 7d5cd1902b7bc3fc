"""Continual metrics on a hand-made accuracy matrix, and the CSV / heatmap writers."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from advarch.continual_metrics import (
    average_accuracy,
    backward_transfer,
    continual_summary,
    forgetting,
    forward_transfer,
    plot_accuracy_matrix,
    save_accuracy_matrix_csv,
)

# R[i, j] after training task i, evaluated on task j. Task 0 improves after task 1 (0.95), so
# Chaudhry's forgetting (drop from the best) differs from −BWT (drop from just-learned).
R = np.array(
    [
        [0.90, 0.10, 0.20],
        [0.95, 0.80, 0.30],
        [0.60, 0.50, 0.95],
    ]
)
B = np.array([0.10, 0.15, 0.10])


def test_metrics_on_hand_made_matrix() -> None:
    assert average_accuracy(R) == pytest.approx((0.60 + 0.50 + 0.95) / 3)
    assert backward_transfer(R) == pytest.approx(((0.60 - 0.90) + (0.50 - 0.80)) / 2)
    assert forward_transfer(R, B) == pytest.approx(((0.10 - 0.15) + (0.30 - 0.10)) / 2)
    assert forgetting(R) == pytest.approx(((0.95 - 0.60) + (0.80 - 0.50)) / 2)
    summary = continual_summary(R, B)
    assert summary == pytest.approx(
        {"avg_acc": 0.683333333, "bwt": -0.3, "fwt": 0.075, "forgetting": 0.325}
    )


def test_bits_per_byte_is_lower_is_better_with_the_same_sign_conventions() -> None:
    # bpb B[i, j]: domain 0 improves after domain 1 (2.0 → 1.9), then rises to 2.5 at the end
    bpb = np.array([[2.0, 3.0, 3.2], [1.9, 2.1, 3.0], [2.5, 2.4, 2.2]])
    untrained = np.array([8.0, 8.0, 8.0])
    summary = continual_summary(bpb, untrained, metric="bpb")
    assert summary["avg_bpb"] == pytest.approx((2.5 + 2.4 + 2.2) / 3)
    # BWT is a gain: negative = forgetting (bpb rose by 0.5 and 0.3 after learning)
    assert summary["bwt"] == pytest.approx(((2.0 - 2.5) + (2.1 - 2.4)) / 2)
    # forgetting is a loss: the rise from the lowest bpb reached (1.9, 2.1) to the final one
    assert summary["forgetting"] == pytest.approx(((2.5 - 1.9) + (2.4 - 2.1)) / 2)
    # FWT is a gain: bpb before training a domain, below the untrained model's
    assert summary["fwt"] == pytest.approx(((8.0 - 3.0) + (8.0 - 3.0)) / 2)
    # the same matrix as accuracy-like "negative bpb" gives the same gains and losses
    mirrored = continual_summary(-bpb, -untrained)
    assert [mirrored[k] for k in ("bwt", "fwt", "forgetting")] == pytest.approx(
        [summary[k] for k in ("bwt", "fwt", "forgetting")]
    )
    with pytest.raises(ValueError, match="metric='loss'"):
        continual_summary(bpb, untrained, metric="loss")


def test_no_forgetting_and_single_task() -> None:
    perfect = np.triu(np.ones((3, 3))) * 0.2 + np.tril(np.ones((3, 3)))  # old tasks stay at 1
    perfect = np.minimum(perfect, 1.0)
    assert backward_transfer(perfect) == 0.0 and forgetting(perfect) == 0.0
    one = np.array([[0.7]])
    assert average_accuracy(one) == pytest.approx(0.7)
    assert math.isnan(backward_transfer(one)) and math.isnan(forgetting(one))
    assert math.isnan(forward_transfer(one, np.array([0.1])))


def test_forgetting_is_negative_where_old_tasks_end_better_than_ever_before() -> None:
    # the README: best over every row but the last (rows before a task was trained included)
    # minus the final value; a task still improving while later ones train gives < 0
    R = np.array([[0.60, 0.30, 0.1], [0.62, 0.80, 0.1], [0.65, 0.81, 0.9]])
    assert forgetting(R) == pytest.approx(((0.62 - 0.65) + (0.80 - 0.81)) / 2)  # -0.02
    bpb = continual_summary(np.array([[3.0, 3.5], [2.9, 2.8]]), np.full(2, 4.0), metric="bpb")
    assert bpb["forgetting"] == pytest.approx(2.9 - 3.0)  # final 2.9, lowest earlier 3.0


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="initial accuracies"):
        forward_transfer(R, np.zeros(2))


def test_csv_and_heatmap_written(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    partial = R.copy()
    partial[2] = np.nan  # an unfinished stream
    path = save_accuracy_matrix_csv(partial, tmp_path / "continual" / "accuracy_matrix.csv", names)
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["trained_through", "a", "b", "c"]
    assert rows[2][0] == "after_b" and float(rows[2][1]) == pytest.approx(0.95)
    assert rows[3][1] == "nan"
    png = plot_accuracy_matrix(partial, tmp_path / "plots" / "accuracy_matrix.png", names)
    assert plot_accuracy_matrix(3 * partial, tmp_path / "bpb.png", names, "bpb").is_file()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
