"""Markdown reports of a run or a sweep, with their figures; optionally logged to W&B."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from advarch.callbacks.expert_load import plot_expert_load
from advarch.checkpoint import config_dir_options
from advarch.config.resolvers import sweep_direction
from advarch.console_summary import SUMMARY_FILE, SUMMARY_KEYS, with_task_names
from advarch.continual_metrics import (
    HIGHER_IS_BETTER,
    average_accuracy,
    backward_transfer,
    forgetting,
    plot_accuracy_matrix,
)
from advarch.reports.figures import (
    FEWSHOT,
    plot_expert_load_over_training,
    plot_fewshot,
    plot_learning_curves,
    plot_sweep_curves,
)
from advarch.reports.run_folders import (
    Metrics,
    is_run,
    read_accuracy_matrix,
    read_file,
    rounded_value,
    run_overrides,
    run_setting,
    searched_keys,
    stream_epochs_per_task,
    sweep_runs,
    task_boundaries,
    trial_error,
    trial_finished,
    unfinished,
    wandb_group,
)


@dataclass
class Report:
    """Markdown lines and the images they show, written under `folder`."""

    folder: Path
    lines: list[str] = field(default_factory=list)
    images: dict[str, Path] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the W&B run's: what it reports on

    def image(self, title: str, path: Path | None, key: str) -> None:
        if path is not None:
            self.images[key] = path
            self.lines += [f"### {title}", "", f"![{title}]({path.relative_to(self.folder)})", ""]

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.lines += [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows),
            "",
        ]

    def write(self) -> Path:
        path = self.folder / "report.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.lines).rstrip() + "\n")
        return path


def _fmt(value: float | None) -> str:
    """Four significant digits, trailing zeros kept (3.900, not 3.9, beside 3.914); large
    values (throughput) whole, with thousands separators."""
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:#.4g}".rstrip(".")


def _count(n: int, noun: str) -> str:
    """`1 MoE layer`, `2 MoE layers`."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def run_report(run_dir: Path, out: Path | None = None) -> Report:
    """Plots and Markdown for one run folder (written into `out`, default `<run>/report`)."""
    report = Report(out or run_dir / "report")
    metrics = Metrics.read(run_dir)
    report.final = final = final_values(run_dir, metrics)
    report.lines += [f"# Run report: `{run_dir}`", ""]
    overrides = run_overrides(run_dir)
    report.config = {"run": str(run_dir), "overrides": list(overrides)}
    if overrides:
        folders = [" ".join(o) for o in config_dir_options(run_dir)]  # (configs it may choose)
        typed = folders + overrides
        report.lines += ["Overrides: " + " ".join(f"`{o}`" for o in typed), ""]
    stopped = unfinished(run_dir, metrics)
    note = []  # a run that did not finish: its "final" metrics are the last it logged
    if stopped:
        note = [f"**{stopped[:1].upper()}{stopped[1:]}**: the values are the last it logged.", ""]
    report.lines += ["## Headline", "", *note]
    _headline(run_dir, final, report)
    report.lines += ["## All final metrics", "", *note]
    names = _summary(run_dir).get("task_names") or ()  # as printed; tasks in their order
    in_order = sorted(final.items(), key=lambda item: _numbers_as_numbers(item[0]))
    named = with_task_names(dict(in_order), names)
    report.table(["metric", "value"], [[k, _fmt(v)] for k, v in named.items()])
    report.lines += ["## Plots", ""]
    boundaries = task_boundaries(metrics, stream_epochs_per_task(run_dir))
    curves = plot_learning_curves(metrics, report.folder / "learning_curves.png", boundaries, names)
    report.image("Learning curves", curves, "learning_curves")
    for problem in metrics.problems:
        report.lines += [f"Left out of the learning curves: {problem}", ""]
    _expert_load_section(run_dir, report)
    _continual_section(run_dir, report)
    adaptation = run_setting(run_dir, "strategy.adaptation", "none")
    fewshot = plot_fewshot(final, report.folder / "fewshot_accuracy.png", adaptation)
    if fewshot is not None:
        rows = [
            [
                f"{split}/{key}",
                _fmt(final[f"{split}/{key}"]),
                _fmt(final.get(f"{split}/{key}_ci95")),
            ]  # fmt: skip
            for split in ("val", "test")
            for key in FEWSHOT
            if f"{split}/{key}" in final
        ]
        report.lines += ["## Few-shot accuracy", ""]
        report.table(["metric", "mean", "± 95% CI"], rows)
        report.image("Few-shot accuracy", fewshot, "fewshot_accuracy")
    return report


HEADLINE = (  # what a reader looks for first, when the run has it
    ("test/bpb", "test bits/byte"),
    ("val/acc", "validation accuracy"),
    ("test/acc", "test accuracy"),
    ("test/mse", "test mean squared error"),
    ("cl/avg_acc", "continual: average final accuracy (ACC)"),
    ("cl/avg_bpb", "continual: average final bits/byte"),
    ("cl/bwt", "continual: backward transfer (BWT)"),
    ("cl/forgetting", "continual: forgetting"),
    ("cl/fwt", "continual: forward transfer (FWT)"),
)


def _headline(run_dir: Path, final: dict[str, float], report: Report) -> None:
    """Headline numbers before the full table: bits/byte against the unigram baseline for
    language models (from the run's `summary.json`), ACC/BWT/forgetting for task streams."""
    baseline = _summary(run_dir).get("unigram_bpb")
    bpb = final.get("val/bpb")
    if bpb is not None and baseline:
        report.lines += [
            f"**validation {bpb:.3f} bits/byte** against the unigram baseline {baseline:.3f} "
            f"({bpb / baseline - 1:+.0%})",
            "",
        ]
    elif bpb is not None:
        report.lines += [f"**validation {bpb:.3f} bits/byte**", ""]
    rows = [[label, _fmt(final[key])] for key, label in HEADLINE if key in final]
    if not rows and bpb is None:  # a kind without a headline metric: its loss
        rows = [[f"{split} loss", _fmt(final[f"{split}/loss"])] for split in ("val", "test")
                if f"{split}/loss" in final]  # fmt: skip
    if rows:
        report.table(["", "value"], rows)


def final_values(run_dir: Path, metrics: Metrics) -> dict[str, float]:
    """A run's final metrics: the CSV log's last values, and where the run finished, those its
    summary printed (throughput over the whole run, not the last logging window)."""
    return {**metrics.final(), **_summary(run_dir).get("metrics", {})}


def _summary(run_dir: Path) -> dict:
    """The run's `summary.json` (final metrics as the run summary printed them, with run-long
    throughput; the unigram baseline; the task names), or {} for a run that did not finish."""
    summary = read_file(run_dir / SUMMARY_FILE, json.loads, {})
    return summary if isinstance(summary, dict) else {}


def _expert_load_section(run_dir: Path, report: Report) -> None:
    npz = run_dir / "plots" / "expert_load_history.npz"
    if not npz.is_file():
        return
    data = np.load(npz)
    steps, load, layers = data["steps"], data["load"], [int(i) for i in data["layers"]]
    report.lines += [
        "## Expert load",
        "",
        f"{_count(len(steps), 'logging window')}, {_count(load.shape[1], 'MoE layer')}, "
        f"{load.shape[2]} experts; "
        f"uniform load is {1 / load.shape[2]:.3f}. Max/min over experts in the last window: "
        + ", ".join(
            f"layer {layer} {np.nanmax(row):.3f}/{np.nanmin(row):.3f}"
            for layer, row in zip(layers, load[-1], strict=True)
        ),
        "",
    ]
    history = plot_expert_load_over_training(
        steps, load, layers, report.folder / "expert_load_history.png"
    )
    report.image("Expert load over training (per layer)", history, "expert_load_history")
    last = plot_expert_load(
        load[-1],
        report.folder / "expert_load_final.png",
        f"expert load, last window (step {int(steps[-1])})",
        layers,
    )
    report.image("Expert load, last window", last, "expert_load_final")


def _continual_section(run_dir: Path, report: Report) -> None:
    """The task matrix of a continual run: accuracy R (digit streams) or bits per byte B (text
    domains; lower is better, so BWT and forgetting are taken on −B, as in training)."""
    for metric, stem, title in (
        ("acc", "accuracy_matrix", "Accuracy matrix R[i, j]"),
        ("bpb", "bpb_matrix", "Bits-per-byte matrix B[i, j]"),
    ):
        path = run_dir / "continual" / f"{stem}.csv"
        if not path.is_file():
            continue
        names, R = read_accuracy_matrix(path)
        sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
        seen = int(np.isfinite(R).all(axis=1).sum())  # finished tasks (rows fully measured)
        report.lines += ["## Continual learning", ""]
        if seen:
            done = R[:seen, :seen]
            report.table(
                ["tasks finished", metric.upper(), "BWT", "forgetting"],
                [
                    [
                        str(seen),
                        _fmt(average_accuracy(done)),
                        _fmt(backward_transfer(sign * done)),
                        _fmt(forgetting(sign * done)),
                    ]
                ],  # fmt: skip
            )
        png = plot_accuracy_matrix(R, report.folder / f"{stem}.png", names, metric)
        report.image(title, png, stem)


def best_run(
    names: list[str],
    overrides: dict[str, dict[str, str]],
    finals: dict[str, dict[str, float]],
    metric: str,
    direction: str,
    optuna_best: dict | None = None,
) -> str | None:
    """The run Optuna reported best (matched by its overrides), else the best `metric`."""
    if optuna_best:
        want = {str(k): v for k, v in optuna_best.items()}
        for name in names:
            if all(_same(overrides[name].get(k), v) for k, v in want.items()):
                return name
    scored = [
        (finals[n][metric], n) for n in names if math.isfinite(finals[n].get(metric, math.nan))
    ]
    if not scored:
        return None
    return (max if direction == "maximize" else min)(scored)[1]


def _same(text: str | None, value: object) -> bool:
    if text is None:
        return False
    try:
        return math.isclose(float(text), float(value), rel_tol=1e-9)
    except (TypeError, ValueError):
        return text == str(value)


def sweep_report(folder: Path) -> Report:
    """Comparison table (varying overrides → final metrics, best marked), curves, run reports."""
    report = Report(folder / "report")
    jobs = sweep_runs(folder)
    runs = {j.name: Metrics.read(j) for j in jobs if is_run(j)}
    overrides = {j.name: dict(o.split("=", 1) for o in run_overrides(j) if "=" in o) for j in jobs}
    finals = {j.name: final_values(j, runs[j.name]) for j in jobs if j.name in runs}
    errors = {j.name: trial_error(j) for j in jobs}
    names = [j.name for j in jobs]
    first = jobs[0] if jobs else folder
    metric = run_setting(first, "optimized_metric", "val/loss")
    direction = run_setting(first, "hydra.sweeper.direction")
    if direction not in ("minimize", "maximize"):
        direction = sweep_direction(metric)
    results_path = folder / "optimization_results.yaml"
    optuna = read_file(results_path, yaml.safe_load)
    finished = [n for n in runs if trial_finished(folder / n)]  # (a stopped one's: no result)
    best = best_run(
        finished, overrides, finals, metric, direction, (optuna or {}).get("best_params")
    )
    searched = searched_keys(folder)  # (drawn alike by every trial: still searched)
    varying = sorted(
        {k for o in overrides.values() for k in o}
        - {k for k in next(iter(overrides.values()), {}) if _constant(overrides, k)}
        | {k for o in overrides.values() for k in o if k.lstrip("+~") in searched}
    )
    fixed = {k: v for k, v in next(iter(overrides.values()), {}).items() if k not in varying}
    keys = [metric] + [
        k for k in SUMMARY_KEYS if k != metric and any(k in f for f in finals.values())
    ]
    report.final = finals.get(best, {}) if best else {}
    report.config = {
        "sweep": str(folder),
        "metric": metric,
        "direction": direction,
        "best_run": best,
        "best_overrides": overrides.get(best, {}) if best else {},
    }
    report.lines += [f"# Sweep report: `{folder}`", ""]
    failed = sum(1 for e in errors.values() if e)
    outcome = (
        f"best by `{metric}` ({direction}){', as reported by Optuna' if optuna else ''}: "
        f"run **{best}**."
        if best
        else f"none has a value of `{metric}`."
    )
    report.lines += [
        f"{len(jobs)} runs ({len(runs)} with metrics, {failed} failed); {outcome}",
        "",
    ]
    if fixed:
        report.lines += [
            "Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in fixed.items()),
            "",
        ]
    rows = []
    for name in names:
        mark = "★ " + name if name == best else name
        cells = [rounded_value(overrides[name].get(k, "—")) for k in varying]
        values = [_fmt(finals[name].get(k)) if name in finals else "—" for k in keys]
        values[0] = values[0] if name in finals else "failed"  # the optimized metric
        links = [f"[report](../{name}/report/report.md)"] if name in runs else []  # from report/
        links += [f"failed: {errors[name]}"] if errors[name] else []
        stopped = name in runs and not errors[name] and unfinished(folder / name, runs[name])
        links += [stopped] if stopped else []
        rows.append([mark, *cells, *values, " · ".join(links) or "—"])
    report.lines += ["## Runs", ""]
    report.table(["run", *varying, *keys, "details"], rows)
    if optuna:
        report.lines += [
            "Optuna best: "
            + ", ".join(f"`{k}={v}`" for k, v in optuna["best_params"].items())
            + f" → {_fmt(float(optuna['best_value']))}",
            "",
        ]
    if not runs:
        return report
    report.lines += ["## Plots", ""]
    labels = {
        n: " ".join(f"{k}={rounded_value(overrides[n][k])}" for k in varying if k in overrides[n])
        for n in runs
    }
    curves = plot_sweep_curves(runs, metric, report.folder / "sweep_curves.png", labels)
    report.image(f"{metric} per run", curves, "sweep_curves")
    for job in jobs:
        if job.name in runs:
            run_report(job, folder / job.name / "report").write()
    return report


def _constant(overrides: dict[str, dict[str, str]], key: str) -> bool:
    values = {o.get(key) for o in overrides.values()}
    return len(values) == 1


# -- entry -------------------------------------------------------------------------------------
def not_reportable(folder: Path) -> str:
    """Why `folder` has no report, in one line: a sweep trial that failed before it logged
    (its `result.json` says why, `error.txt` holds the traceback), or neither a run nor a sweep
    folder (then its newest run, where it holds runs)."""
    reason = trial_error(folder) if folder.is_dir() else None
    if reason is not None:
        return f"{folder}: this sweep trial failed ({reason}); see {folder / 'error.txt'}"
    runs = sorted(p for p in folder.iterdir() if is_run(p)) if folder.is_dir() else []
    hint = f"; it holds {len(runs)} run(s), the newest {runs[-1]}" if runs else ""
    return (
        f"{folder} is neither a run folder (csv/version_*/metrics.csv) nor a sweep folder "
        f"(numbered run subfolders){hint}"
    )


def write_report(folder: str | Path, wandb: bool = False) -> Path:
    """Write `<folder>/report/report.md` (and PNGs) for a run or a sweep folder; its path.

    Raises:
        FileNotFoundError: `folder` is neither a run (CSV logs) nor a sweep (numbered runs),
            or is a sweep trial that failed (`not_reportable` says which).
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if is_run(folder):
        report = run_report(folder)
    elif folder.is_dir() and sweep_runs(folder):
        report = sweep_report(folder)
    else:
        raise FileNotFoundError(not_reportable(folder))
    path = report.write()
    if wandb:
        first = folder if is_run(folder) else sweep_runs(folder)[0]  # (a trial: the sweep's)
        group = wandb_group(first) or folder.name
        project = run_setting(first, "logger.wandb.project") or "advarch"
        log_to_wandb(report, name=f"report-{folder.name}", group=group, project=project)
    return path


def log_to_wandb(report: Report, name: str, group: str, project: str = "advarch") -> Path:
    """Log the report's images and final metrics to an offline W&B run in `<report>/wandb`,
    in the W&B project and group of the runs it reports on (a sweep's: its trials' group)."""
    import wandb

    run = wandb.init(  # its own run even when the calling process has one open (a notebook)
        mode="offline", dir=str(report.folder), project=project, name=name, group=group,
        job_type="report", config=report.config, reinit="create_new",
        settings=wandb.Settings(quiet=True, silent=True),
    )  # fmt: skip
    try:
        run.log({f"report/{key}": wandb.Image(str(path)) for key, path in report.images.items()})
        run.summary.update(report.final)
        return Path(run.dir).parent
    finally:
        run.finish()


def _numbers_as_numbers(key: str) -> list[str | int]:
    """A sort key that orders `task_2` before `task_10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
