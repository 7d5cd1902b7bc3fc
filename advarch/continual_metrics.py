"""Continual-learning metrics over a per-task metric matrix, and its CSV and heatmap.

R is (T, T) with R[i, j] = the metric on task j after training tasks 0..i; b (T,) holds the
metric of the randomly initialised model on each task. The metric is accuracy (`acc`, higher
is better) or bits per byte (`bpb`, lower is better). Definitions (0-based indices), written
for a higher-is-better metric:

- ACC (GEM, Lopez-Paz & Ranzato 2017, eq. 2): mean of the last row, 1/T Σ_j R[T−1, j].
- BWT (GEM eq. 3): 1/(T−1) Σ_{j<T−1} (R[T−1, j] − R[j, j]); negative = forgetting.
- FWT (GEM eq. 4): 1/(T−1) Σ_{j≥1} (R[j−1, j] − b_j); accuracy on a task before training it,
  relative to the untrained model.
- Forgetting (Chaudhry et al. 2018, "Riemannian Walk", eq. 6 averaged over tasks):
  1/(T−1) Σ_{j<T−1} (max_{l<T−1} R[l, j] − R[T−1, j]); the drop from the best accuracy ever
  reached on task j to the final one (the max runs over every earlier row, as in the paper,
  rows from before task j was trained included): negative where the final one beats them all.

For a lower-is-better metric (`bpb`) the same definitions are applied to −R and −b, so the
sign conventions stay: BWT and FWT are GAINS (positive = the metric got better: lower bpb;
negative BWT = forgetting), and forgetting is a LOSS (positive = worse than the best value
ever reached: for bpb, the rise from the lowest bpb on a task to its final bpb). The average
is reported in the metric's own units (`avg_acc`, `avg_bpb`); all values are in those units.

Metrics that need two tasks (BWT, FWT, forgetting) are NaN for T = 1.

Shapes: T tasks.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _square(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {R.shape}")
    return R


def average_accuracy(R: np.ndarray) -> float:
    """ACC: mean accuracy over all tasks after training the last one."""
    return float(_square(R)[-1].mean())


def backward_transfer(R: np.ndarray) -> float:
    """BWT: mean change on earlier tasks from just after learning them to the end."""
    R = _square(R)
    T = R.shape[0]
    if T < 2:
        return math.nan
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def forward_transfer(R: np.ndarray, initial: np.ndarray) -> float:
    """FWT: mean accuracy on task j before training it (row j−1) minus the untrained b_j."""
    R = _square(R)
    b = np.asarray(initial, dtype=np.float64)
    T = R.shape[0]
    if b.shape != (T,):
        raise ValueError(f"initial accuracies must have shape ({T},), got {b.shape}")
    if T < 2:
        return math.nan
    before = R[np.arange(T - 1), np.arange(1, T)]  # (T−1,) R[j−1, j]
    return float(np.mean(before - b[1:]))


def forgetting(R: np.ndarray) -> float:
    """Chaudhry et al. 2018: mean over j < T−1 of max_{l<T−1} R[l, j] − R[T−1, j]."""
    R = _square(R)
    if R.shape[0] < 2:
        return math.nan
    best = R[:-1, :-1].max(axis=0)  # (T−1,) best earlier accuracy on each old task
    return float(np.mean(best - R[-1, :-1]))


HIGHER_IS_BETTER = {"acc": True, "bpb": False}


def continual_summary(R: np.ndarray, initial: np.ndarray, metric: str = "acc") -> dict[str, float]:
    """All four metrics keyed as logged: `avg_<metric>`, `bwt`, `fwt`, `forgetting`.

    `metric` is `acc` (higher is better) or `bpb` (lower is better); see the module docstring
    for the sign conventions.
    """
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"metric={metric!r} is not one of {sorted(HIGHER_IS_BETTER)}")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    R, b = sign * _square(R), sign * np.asarray(initial, dtype=np.float64)
    return {
        f"avg_{metric}": sign * average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, b),
        "forgetting": forgetting(R),
    }


def save_accuracy_matrix_csv(R: np.ndarray, path: Path, task_names: Sequence[str]) -> Path:
    """Write R with a header of task names; row i is labelled `after_<task i>` (NaN = not yet)."""
    R = _square(R)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trained_through", *task_names])
        for name, row in zip(task_names, R, strict=True):
            writer.writerow([f"after_{name}", *(f"{v:.6f}" for v in row)])
    return path


def plot_accuracy_matrix(
    R: np.ndarray, path: Path, task_names: Sequence[str], metric: str = "acc"
) -> Path:
    """Save an annotated heatmap of R (rows: trained through task i; columns: evaluated task).

    Accuracy is drawn on [0, 1]; bits per byte on the matrix's own range with the colour map
    reversed, so brighter is better for both.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    R = _square(R)
    T = R.shape[0]
    size = 1.2 + 0.75 * T
    fig = Figure(figsize=(size + 1.0, size))  # (no pyplot: a notebook keeps its backend)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finite = R[np.isfinite(R)]
    if metric == "acc" or finite.size == 0:
        low, high, cmap = 0.0, 1.0, "viridis"
    else:
        low, high, cmap = float(finite.min()), float(finite.max()), "viridis_r"
    image = ax.imshow(np.ma.masked_invalid(R), vmin=low, vmax=high, cmap=cmap)
    for i in range(T):
        for j in range(T):
            if np.isfinite(R[i, j]):
                bright = (R[i, j] - low) / max(high - low, 1e-12)
                bright = bright if metric == "acc" else 1 - bright
                color = "black" if bright > 0.6 else "white"
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(T), task_names, rotation=45, ha="right")
    ax.set_yticks(range(T), [f"after {n}" for n in task_names])
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("trained through task i")
    ax.set_title("accuracy R[i, j]" if metric == "acc" else f"{metric} B[i, j] (lower is better)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
