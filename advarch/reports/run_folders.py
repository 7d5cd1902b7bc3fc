"""Reading run and sweep folders: the CSV metrics log, task matrices, overrides, settings."""

from __future__ import annotations

import csv
import importlib
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from advarch.console_summary import SUMMARY_FILE
from advarch.reasons import short_reason
from advarch.tracking import tracker_group

log = logging.getLogger("advarch")
RESULT_FILE = "result.json"  # a sweep trial's outcome, written by `advarch.sweeps`


def read_file(path: Path, parse: Callable[[str], Any], default: Any = None) -> Any:
    """`parse` of a run-folder file's text, or `default` when it is missing or damaged (with a
    warning naming it: one broken file does not stop a report)."""
    if not path.is_file():
        return default
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        log.warning("skipping %s (%s: %s)", path, type(err).__name__, short_reason(err))
        return default


@dataclass
class Metrics:
    """A run's CSV log as float columns (NaN where a row did not log the metric); `problems`:
    the damaged log files left out, each as `<path> (what is wrong)`."""

    columns: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, run_dir: Path) -> Metrics:
        """Concatenate `csv/version_*/metrics.csv` in version order (a resumed run adds one).
        A damaged file is left out with a warning naming it: the rest of a report still holds."""
        rows: list[dict[str, str]] = []
        problems = []
        for path in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=_version):
            try:
                rows += _log_rows(path)
            except ValueError as err:
                problems.append(f"{path} ({err})")
                log.warning("skipping %s", problems[-1])
        keys = list(dict.fromkeys(k for row in rows for k in row))
        columns = {k: np.array([_float(row.get(k)) for row in rows]) for k in keys}
        return cls(columns, problems)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows that logged `key`."""
        values = self.columns[key]
        ok = np.isfinite(values)
        return self.columns.get("step", np.arange(len(values)))[ok], values[ok]

    def matching(self, pattern: str) -> list[str]:
        """Columns with at least one value whose name fully matches `pattern`."""
        rx = re.compile(pattern)
        return [k for k, v in self.columns.items() if rx.fullmatch(k) and np.isfinite(v).any()]

    def final(self) -> dict[str, float]:
        """The last logged value of every metric (step and epoch excluded)."""
        out = {}
        for key, values in self.columns.items():
            finite = values[np.isfinite(values)]
            if key not in ("step", "epoch") and finite.size:
                out[key] = float(finite[-1])
        return out


def _log_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV metrics log, as Lightning's CSVLogger writes it.

    Raises:
        ValueError: what makes the file no such log (not UTF-8 or CSV text, empty, no `step`
            column, a line with more fields than the header, no numeric step at all).
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ValueError("empty file")
            if "step" not in reader.fieldnames:
                header = ",".join(reader.fieldnames)
                raise ValueError(f"no `step` column: its first line is {header[:60]!r}")
            rows = []
            for row in reader:
                if None in row:  # DictReader's key for fields beyond the header's
                    raise ValueError(f"line {reader.line_num} has more fields than the header")
                rows.append(row)
    except UnicodeDecodeError as err:
        what = f"byte {err.start} is {err.object[err.start]:#04x}"
        raise ValueError(f"not UTF-8 text: {what}") from None
    except csv.Error as err:
        raise ValueError(f"not CSV: {err}") from None
    if not any(math.isfinite(_float(row["step"])) for row in rows):
        raise ValueError("no numeric value in its `step` column")
    return rows


def _float(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def unfinished(run_dir: Path, metrics: Metrics) -> str | None:
    """`stopped at step 60 of 200 — not finished` for a run that wrote no `summary.json`
    (killed, crashed or interrupted: its last logged values are not final ones); None for a
    run that finished."""
    if (run_dir / SUMMARY_FILE).is_file():
        return None
    steps = metrics.columns.get("step", np.array([]))
    if not np.isfinite(steps).any():
        return f"not finished (no {SUMMARY_FILE})"
    done = int(np.nanmax(steps)) + 1  # Lightning logs a step under the number of steps before it
    total = int(run_setting(run_dir, "trainer.max_steps") or -1)
    if 0 < total <= done:
        return f"trained its {total} steps but stopped before its final test — not finished"
    return f"stopped at step {done}{f' of {total}' if total > 0 else ''} — not finished"


def read_accuracy_matrix(path: Path) -> tuple[list[str], np.ndarray]:
    """(task names, R (T, T)) from the CSV `save_accuracy_matrix_csv` writes."""
    with path.open(newline="") as f:
        header, *rows = list(csv.reader(f))
    return header[1:], np.array([[_float(v) for v in row[1:]] for row in rows], dtype=float)


def is_run(folder: Path) -> bool:
    return any((folder / "csv").glob("version_*/metrics.csv"))


def sweep_runs(folder: Path) -> list[Path]:
    """Job folders of a multirun (`0/`, `1/`, …, numerically ordered), finished or not."""
    jobs = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(jobs, key=lambda p: int(p.name))


def task_boundaries(metrics: Metrics, epochs_per_task: int | None) -> list[float]:
    """Steps where a task stream moved to its next task (the first training step of each later
    task). Rows that trained nothing count for none: the final test's is logged an epoch past
    the stream's last."""
    if not epochs_per_task or "epoch" not in metrics.columns:
        return []
    epochs = metrics.columns["epoch"]
    trained = np.zeros(len(epochs), dtype=bool)
    for key in metrics.matching(r"train/.+"):
        trained |= np.isfinite(metrics.columns[key])
    steps = metrics.columns.get("step", np.arange(len(epochs)))[trained & np.isfinite(epochs)]
    tasks = epochs[trained & np.isfinite(epochs)] // epochs_per_task
    return [float(steps[i]) for i in range(1, len(tasks)) if tasks[i] > tasks[i - 1]]


def stream_epochs_per_task(run_dir: Path) -> int | None:
    """The epochs each task of the run's stream trains: its data's `epochs_per_task` option, or
    where its data fixes them, its data class's (`data=text_domains`: one epoch a domain);
    None for data that is no task stream."""
    value = run_setting(run_dir, "data.epochs_per_task")
    target = run_setting(run_dir, "data._target_")
    if value is None and target is not None:
        module, _, name = target.rpartition(".")
        try:
            value = getattr(importlib.import_module(module), name).epochs_per_task
        except (ImportError, AttributeError, ValueError):  # (no such class, or no stream)
            return None
    return int(value) if value is not None else None


def trial_error(run_dir: Path) -> str | None:
    """Why a sweep trial failed (the one line of its `result.json`), or None: also for one a
    signal stopped (`interrupted`: its checkpoint goes on, its report says where it stopped)."""
    result = read_file(run_dir / RESULT_FILE, json.loads, {})
    failed = isinstance(result, dict) and result.get("status", "failed") == "failed"
    return result.get("error") if failed else None


def trial_finished(run_dir: Path) -> bool:
    """Whether a sweep trial's `result.json` says it finished (status `ok`), as the sweep's
    table ranks it; a run without one (not a trial) counts as finished."""
    result = read_file(run_dir / RESULT_FILE, json.loads, {})
    return not result or isinstance(result, dict) and result.get("status") == "ok"


def run_overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides (`.hydra/overrides.yaml`), as written."""
    overrides = read_file(run_dir / ".hydra" / "overrides.yaml", yaml.safe_load)
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def wandb_group(run_dir: Path) -> str | None:
    """The W&B group train.py gave the run in `run_dir` (the user's `logger.wandb.group`, else
    its sweep's, experiment's or run name's: `tracker_group`); None where no run name is kept."""
    run_name = run_setting(run_dir, "run_name")
    if run_name is None:
        return None
    sweep = None
    if run_setting(run_dir, "hydra.mode") == "MULTIRUN":  # (its trial folder may be nested)
        sweep = Path(run_setting(run_dir, "hydra.sweep.dir") or run_dir.parent).name
    experiment = run_setting(run_dir, "hydra.runtime.choices.experiment")
    return run_setting(run_dir, "logger.wandb.group") or tracker_group(run_name, experiment, sweep)


def run_setting(run_dir: Path, key: str, default: str | None = None) -> str | None:
    """A key of the run's config (`run_name`, `optimized_metric`, `hydra.sweeper.direction`):
    resolved as the run logged it (`csv/version_*/hparams.yaml`), else as Hydra saved it
    (`.hydra/`, where an interpolation such as the default `run_name` does not count)."""
    logged = sorted((run_dir / "csv").glob("version_*/hparams.yaml"), key=_version)[-1:]
    for path in [*logged, run_dir / ".hydra" / "config.yaml", run_dir / ".hydra" / "hydra.yaml"]:
        node = read_file(path, yaml.safe_load)
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and "${" not in str(node):
            return str(node)
    return default


def _version(path: Path) -> int:
    """N of a `csv/version_N/…` file."""
    return int(path.parent.name.split("_")[-1])


def rounded_value(text: str, digits: str = ".4g") -> str:
    """A sampled float value (`0.0010360000342631323`) in `digits`; anything else, and a value
    as short as typed (`3e-3`), as is."""
    if not any(c in text for c in ".eE"):
        return text
    try:
        short = format(float(text), digits)
    except ValueError:
        return text
    return short if len(short) < len(text) else text


SWEEP_OVERRIDES_FILE = "sweep_overrides.yaml"  # a sweep's command line (`SweepSummary`)


def sweep_overrides(sweep_dir: Path) -> list[str]:
    """The overrides typed on the sweep's command line (saved by `SweepSummary` at its start)."""
    saved = sweep_dir / SWEEP_OVERRIDES_FILE
    typed = read_file(saved, yaml.safe_load, [])
    return [str(o) for o in typed] if isinstance(typed, list) else []


def searched_keys(sweep_dir: Path) -> set[str]:
    """The keys a sweep sets apart per trial: swept on its command line (`model.depth=1,2`) or
    in its sweeper's search space (`hparams_search=optuna`: `model.dim: choice(96, 128, 192)`,
    from a trial's `.hydra/hydra.yaml`). Trials that drew one value of such a key alike still
    show it as a column: it was searched, not fixed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    record = next(iter(sorted(sweep_dir.glob("*/.hydra/hydra.yaml"))), None)  # (one for all)
    hydra_config = (read_file(record, yaml.safe_load) if record else None) or {}
    space = ((hydra_config.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    parser, keys = OverridesParser.create(), set()
    for override in [*sweep_overrides(sweep_dir), *(f"{k}={v}" for k, v in space.items())]:
        try:
            parsed = parser.parse_override(override)
        except Exception:  # noqa: BLE001  (a column too many rather than a failed table)
            continue
        if parsed.is_sweep_override():
            keys.add(parsed.key_or_group)
    return keys
