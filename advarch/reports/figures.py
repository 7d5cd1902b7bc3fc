"""The report's PNG figures, drawn with matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from advarch.console_summary import task_named
from advarch.reports.run_folders import Metrics

CURVE_PANELS = (  # (title, column pattern) — a panel is drawn when any column matches
    ("loss", r"(train|val)/loss"),
    ("accuracy", r"train/acc_epoch|val/acc"),
    ("validation accuracy per task", r"val/task_\d+/acc"),
    ("validation bits per byte per task", r"val/task_\d+/bpb"),
    ("loss per task", r"(train|val)/task_(?!\d+/)[^/]+/loss"),  # a multi-task run's named tasks
    ("gate similarity between tasks (cosine)", r"val/gate_cosine"),
    ("router entropy (nats)", r"moe/layer\d+/entropy"),
    ("learning rate", r"lr-.*"),
)
FEWSHOT = ("acc", "raw_proto_acc")  # the run's few-shot accuracy, the raw-input baseline's
ADAPTED = {  # strategy.adaptation → what the run's `acc` measured
    "none": "ProtoNet",
    "finetune_head": "ProtoNet + fine-tuned head",
    "fomaml": "Proto-MAML (first-order)",
}


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")  # room for outside legends
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_learning_curves(
    metrics: Metrics, path: Path, boundaries: Sequence[float] = (), task_names: Sequence[str] = ()
) -> Path | None:
    """One panel per `CURVE_PANELS` entry that has data, metric vs optimizer step.

    `boundaries` (steps) are drawn as dashed lines: where a task stream changed task, so
    forgetting shows as an earlier task's validation curve rising or falling after them.
    `task_names` name the per-task curves as the report's tables do (`val/task_1/bpb (net)`).
    """
    panels = [(t, metrics.matching(p)) for t, p in CURVE_PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(6.0 * cols, 3.6 * rows)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        drawn: dict[tuple, Any] = {}  # identical series (e.g. the lr of two parameter groups)
        for key in keys:  # are one line, labelled with every name
            steps, values = metrics.series(key)
            label = task_named(key, task_names)
            same = drawn.get((tuple(steps), tuple(values)))
            if same is not None:
                same.set_label(f"{same.get_label()} = {label}")
                continue
            (line,) = ax.plot(steps, values, marker="o" if len(values) < 30 else None, ms=3,
                              label=label)  # fmt: skip
            drawn[(tuple(steps), tuple(values))] = line
        for step in boundaries:
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=title, xlabel="step" + (" (dashed: next task)" if boundaries else ""))
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_expert_load_over_training(
    steps: np.ndarray, load: np.ndarray, layers: Sequence[int], path: Path
) -> Path:
    """One heatmap per MoE layer: logging window (rows, by step) × expert, load fraction."""
    n = len(layers)
    cols = min(2, n)
    rows = math.ceil(n / cols)
    experts = load.shape[2]
    fig = _figure(max(4.0, 0.5 * experts + 2.5) * cols, max(2.8, 0.25 * len(steps) + 1.6) * rows)
    vmax = np.nanmax(load) if np.isfinite(load).any() else 1.0
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(load[:, i, :], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set(title=f"layer {layer}", xlabel="expert", ylabel="step")
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 8)).round().astype(int)
        ax.set_yticks(ticks, [str(int(steps[t])) for t in ticks])
        ax.set_xticks(range(experts))
        fig.colorbar(image, ax=ax, label="fraction of token-slots")
    return _save(fig, path)


def plot_fewshot(final: dict[str, float], path: Path, adaptation: str = "none") -> Path | None:
    """Bars of few-shot accuracy (the run's, named by its `adaptation`, vs raw prototypes) per
    split with 95% CIs.

    Drawn only for few-shot runs: those that log `<split>/acc_ci95` or `raw_proto_acc`.
    """
    if not any(k.endswith(("/acc_ci95", "/raw_proto_acc")) for k in final):
        return None
    labels = {"acc": ADAPTED.get(adaptation, adaptation), "raw_proto_acc": "raw prototypes"}
    bars = [
        (f"{split} {labels[key]}", final[f"{split}/{key}"], final.get(f"{split}/{key}_ci95", 0.0))
        for split in ("val", "test")
        for key in FEWSHOT
        if f"{split}/{key}" in final
    ]
    if not bars:
        return None
    fig = _figure(1.6 * len(bars) + 2.0, 3.6)
    ax = fig.add_subplot()
    names, means, cis = zip(*bars, strict=True)
    ax.bar(range(len(bars)), means, yerr=cis, capsize=6, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(bars)), names, rotation=15)
    ax.set(ylabel="accuracy", ylim=(0.0, 1.0), title="few-shot accuracy (95% CI over episodes)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_sweep_curves(
    runs: dict[str, Metrics], key: str, path: Path, labels: dict[str, str] | None = None
) -> Path | None:
    """`key` vs step for every run of a sweep, on one axis; legend: each run's overrides."""
    curves = {name: m.series(key) for name, m in runs.items() if key in m.matching(re.escape(key))}
    if not curves:
        return None
    names = {name: (labels or {}).get(name) or name for name in curves}
    ncols = 2 if max(map(len, names.values())) <= 48 else 1  # a long label takes a whole row
    fig = _figure(7.0, 4.0 + 0.2 * math.ceil(len(curves) / ncols))  # + the legend's rows
    ax = fig.add_subplot()
    for name, (steps, values) in curves.items():
        ax.plot(steps, values, marker="o" if len(values) < 30 else None, ms=3, label=names[name])
    ax.set(title=f"{key} per run", xlabel="step", ylabel=key)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=7, ncols=ncols, loc="outside lower center")  # below: it hides no curve
    return _save(fig, path)


def plot_retrieval_by_quality(buckets: Sequence[dict], path: Path) -> Path | None:
    """Bits per byte per neighbour-quality bucket, one bar per model (`retro_report.py`).

    ``buckets``: `split_by_quality`'s entries — `min_shared`, `fraction`, and the bits/byte of
    each compared model under its name. None when no bucket has chunks.
    """
    buckets = [b for b in buckets if b["fraction"] > 0]
    if not buckets:
        return None
    skip = {"min_shared", "fraction", "gain_vs_padding", "gain_vs_plain"}
    models = [k for k in buckets[0] if k not in skip]
    bounds = [b["min_shared"] for b in buckets]
    ticks = [
        f"{lo}–{hi - 1} tokens" if hi else f"≥ {lo} tokens"
        for lo, hi in zip(bounds, [*bounds[1:], None], strict=True)
    ]
    fig = _figure(2.2 * len(buckets) + 5.0, 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        x = np.arange(len(buckets)) + (i - (len(models) - 1) / 2) * width
        ax.bar(x, [b.get(model, np.nan) for b in buckets], width, label=model)
    shares = [f"{100 * b['fraction']:.0f}% of chunks" for b in buckets]
    labels = [f"{t}\n{share}" for t, share in zip(ticks, shares, strict=True)]
    ax.set_xticks(range(len(buckets)), labels)
    ax.set(
        ylabel="bits per byte",
        title="held-out bits/byte by neighbour quality "
        "(longest run the first neighbour's continuation shares with the true one)",
    )
    ax.title.set_fontsize(9)
    values = np.array([b.get(m, np.nan) for b in buckets for m in models], dtype=float)
    low, high = np.nanmin(values), np.nanmax(values)
    pad = 0.15 * (high - low) or 0.05 * abs(high) or 1.0
    ax.set_ylim(low - pad, high + pad)  # from near the lowest bar: hundredths of a bit show
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
