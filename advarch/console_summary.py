"""What a run prints: the resolved config as a tree, and a closing summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.tree import Tree

from advarch.console_log import console_width, keep_in_log
from advarch.spec import DataSpec
from advarch.tracking import sync_hint

ORDER = ("data", "model", "strategy", "trainer", "callbacks", "logger", "paths")


def print_config_tree(cfg: DictConfig, save_to: Path | None = None, echo: bool = True) -> None:
    """Save the resolved config as a rich tree (main groups first); print it when `echo`.
    Long values (paths) wrap on the console, never cropped, and the file is as wide as its
    longest line: a cropped path looked whole."""
    tree = Tree("config", guide_style="dim")
    keys = [k for k in ORDER if k in cfg] + [k for k in cfg if k not in ORDER]
    longest = 0
    for key in keys:
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        longest = max(longest, *(len(line) for line in text.splitlines() or [""]))
        tree.add(key).add(
            Syntax(text, "yaml", theme="ansi_dark", background_color="default", word_wrap=True)
        )
    if echo:
        Console(width=console_width()).print(tree)
    if save_to is not None:
        with save_to.open("w") as f:
            Console(file=f, width=max(120, longest + 16), color_system=None).print(tree)


SUMMARY_FILE = "summary.json"  # a run's final metrics and baselines, for reports and tools
SUMMARY_KEYS = (  # the metrics a run summary and a sweep table show, when a run has them
    "val/loss",
    "val/bpb",
    "val/acc",
    "test/loss",
    "test/bpb",
    "test/acc",
    "test/acc_ci95",
    "test/raw_proto_acc",
    "test/raw_proto_acc_ci95",
    "cl/avg_acc",
    "cl/avg_bpb",
    "cl/bwt",
    "cl/fwt",
    "cl/forgetting",
)


def throughput_line(metrics: dict[str, float]) -> str:
    """`training throughput 12,345 tokens/s · 96.4 samples/s · MFU 41.2%` (MFU when known;
    samples/s alone where a sample is one token, a feature vector: runs log no token rate
    then, and older runs' summaries logged the same rate twice)."""
    tokens, samples = metrics.get("train/tokens_per_s"), metrics.get("train/samples_per_s")
    rates = [f"{samples:,.1f} samples/s"] if samples is not None else []
    if tokens is not None and (samples is None or not math.isclose(tokens, samples, rel_tol=1e-6)):
        rates.insert(0, f"{tokens:,.0f} tokens/s")
    mfu = [f"MFU {metrics['train/mfu']:.1%}"] if "train/mfu" in metrics else []
    return "training throughput " + " · ".join(rates + mfu)


def matrix_lines(output_dir: Path) -> list[str]:
    """A continual run's task matrix (`continual/*_matrix.csv`) as aligned text lines."""
    import csv

    lines = []
    for path in sorted((output_dir / "continual").glob("*_matrix.csv")):
        with path.open() as f:
            rows = list(csv.reader(f))
        name = path.stem.removesuffix("_matrix")
        width = max(len(c) for r in rows for c in r[:1]) + 1
        lines.append(f"{name} matrix (row: trained through, column: evaluated on) — {path.name}")
        for r in rows:
            cells = r[1:] if r is rows[0] else [f"{float(c):.3f}" for c in r[1:]]
            lines.append(r[0].ljust(width) + " ".join(c.rjust(12) for c in cells))
    return lines


def task_columns(task_names: Sequence[str]) -> dict[str, str]:
    """`task_<j>` (a task stream's metric keys) → the name of task j."""
    return {f"task_{j}": name for j, name in enumerate(task_names)}


def task_named(key: str, task_names: Sequence[str]) -> str:
    """A `<split>/task_<j>/<metric>` key followed by the name of task j, as the summary's table
    names the columns (`test/task_1/bpb (net)`): the key as the CSV and W&B log it, the task
    as the console shows it. Other keys as they are."""
    names = task_columns(task_names)
    parts = key.split("/")
    return f"{key} ({names[parts[1]]})" if len(parts) == 3 and parts[1] in names else key


def with_task_names(metrics: dict[str, float], task_names: Sequence[str]) -> dict[str, float]:
    """`metrics` with each key `task_named`."""
    return {task_named(key, task_names): value for key, value in metrics.items()}


def split_table_lines(
    metrics: dict[str, float], split: str, task_names: Sequence[str]
) -> list[str]:
    """A split's metrics as aligned text lines: one row per metric, its value over all the
    data, then each task's, a column per task name, where the run scored tasks apart (task
    streams: `<split>/task_<j>/<metric>`; multi-task data: `<split>/<task name>/<metric>`)."""
    columns_of = task_columns(task_names) | {name: name for name in task_names}
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] != split or len(parts) not in (2, 3):
            continue
        column = columns_of.get(parts[1]) if len(parts) == 3 else "all"
        if column is not None:
            rows.setdefault(parts[-1], {})[column] = value
    if not rows:
        return []
    columns = ["all", *(n for n in task_names if any(n in r for r in rows.values()))]
    header = f"{split} metrics"
    width = max(len(header), *(len(name) for name in rows)) + 1
    cell = max(10, *(len(c) + 2 for c in columns))
    lines = [header.ljust(width) + "".join(c.rjust(cell) for c in columns)]
    for name, values in rows.items():
        cells = [f"{values[c]:.4f}" if c in values else "" for c in columns]
        lines.append(name.ljust(width) + "".join(c.rjust(cell) for c in cells))
    return lines


def weighting_lines(cfg: DictConfig, table: list[str]) -> list[str]:
    """What a task table's `loss` over all tasks is where `strategy.task_weights` weighs it
    (the mean of the tasks' losses so weighted, not of every example's: beside a plain `mse`)."""
    weights = OmegaConf.select(cfg, "strategy.task_weights", default=None)
    if not table or weights is None:
        return []
    weighted = f"strategy.task_weights={list(weights)}"
    return [f"loss (all) = the tasks' losses weighted by {weighted} (the objective trained); "
            "other rows weigh every example alike"]  # fmt: skip


def unigram_baseline(spec: DataSpec, metrics: dict[str, float]) -> float | None:
    """The unigram model's validation bits per byte: on the tokens validation scored
    (`val/unigram_bpb`), else (a checkpoint from before it) on the whole validation split."""
    return metrics.get("val/unigram_bpb", spec.extras.get("unigram_bpb"))


def print_summary(
    cfg: DictConfig,
    spec: DataSpec,
    metrics: dict[str, float],
    output_dir: Path,
    run_label: str | None = None,
) -> None:
    """A few lines a user reads after training: quality against a baseline, and where things
    are; under a title that names a sweep's trial (`run_label`)."""
    lines = []
    memorised = OmegaConf.select(cfg, "trainer.overfit_batches") or 0
    loss = metrics.get("train/loss_epoch", metrics.get("train/loss"))
    if memorised and loss is not None:  # (debug=overfit: what it checks)
        lines.append(f"overfit_batches={memorised}: train/loss {loss:.3f} on the batches it "
                     "memorises (validation reads held-out ones: expect it to rise)")  # fmt: skip
    bpb = metrics.get("val/bpb")
    baseline = unigram_baseline(spec, metrics)
    if bpb is not None and baseline is not None:
        verdict = "below" if bpb < baseline else "NOT below"
        lines.append(
            f"validation bits/byte {bpb:.3f} — {verdict} the unigram baseline {baseline:.3f}"
        )
    matrix = matrix_lines(output_dir)  # a continual run's validation matrix
    # a run that scored tasks apart: its test values, overall and per task
    table = split_table_lines(metrics, "test", spec.task_names)
    table = table if table and table[0].split()[2:] != ["all"] else []  # with task columns
    for key in SUMMARY_KEYS:
        shown = key in ("val/loss", "val/bpb") and bpb is not None
        shown = shown or (bool(table) and key.startswith("test/"))
        if key in metrics and not shown:
            lines.append(f"{key} = {metrics[key]:.4f}")
    lines += matrix + table + weighting_lines(cfg, table)
    if "train/tokens_per_s" in metrics or "train/samples_per_s" in metrics:
        lines.append(throughput_line(metrics))
    lines.append(f"checkpoint: {output_dir / 'checkpoints' / 'last.ckpt'}")
    profiles = sorted(output_dir.glob("*-profile.txt"))  # (debug=profiler's, per stage)
    if profiles:
        lines.append(f"profile: {', '.join(p.name for p in profiles)} in the run folder")
    lines.append(f"run folder (config, CSV logs, plots): {output_dir}")
    hint = sync_hint(output_dir)
    if hint:
        lines.append(hint)
    console = Console(soft_wrap=True)  # paths and commands stay whole, never broken mid-line
    title = "advarch run summary" + (f" · {run_label}" if run_label else "")
    console.rule(escape(title), align="left")
    for line in lines:
        console.print(line, markup=False, highlight=False)
    keep_in_log(title, *lines)


def save_summary(spec: DataSpec, metrics: dict[str, float], output_dir: Path) -> Path:
    """`<run>/summary.json`: the final metrics, the data's unigram baseline (if any) and its
    task names (a report names the tasks as the summary does)."""
    import json

    path = output_dir / SUMMARY_FILE
    summary = {
        "metrics": metrics,
        "unigram_bpb": unigram_baseline(spec, metrics),
        "task_names": list(spec.task_names),
    }
    path.write_text(json.dumps(summary, indent=1, default=float))
    return path
