"""Multirun bookkeeping: each trial's result file, and the table a sweep ends with.

Every trial writes `result.json` (its overrides, status, optimized metric and final metrics)
into its folder; when the sweep ends, the Hydra callback `SweepSummary` collects them into
`<sweep dir>/summary.md` and `summary.csv`, best first, and prints the table. A sweep where
every trial failed exits non-zero.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from rich.text import Text

from advarch.atomic import write_text_atomic
from advarch.config.resolvers import sweep_direction
from advarch.console_log import console_width
from advarch.reports.run_folders import (
    RESULT_FILE,
    SWEEP_OVERRIDES_FILE,
    rounded_value,
    run_overrides,
    searched_keys,
    sweep_overrides,
)
from advarch.stop_signals import hold_between_trials


def trial_overrides(job_overrides: list[str], sweep_overrides: list[str]) -> list[str]:
    """The overrides that set this trial apart: those not typed once for the whole sweep.

    Compared by key and value, not text: Hydra's sweeper hands a job `trainer.deterministic=True`
    for the `trainer.deterministic=true` typed, which set no trial apart."""
    common = {_parsed(o) for o in sweep_overrides}
    return [o for o in job_overrides if _parsed(o) not in common]


def shared_overrides(sweep_overrides: list[str]) -> list[str]:
    """The overrides of a sweep's command line that every trial runs, as typed (not the
    swept ones: `model.depth=1,2`, `choice(…)`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        return [o for o in sweep_overrides if not parser.parse_override(o).is_sweep_override()]
    except Exception:  # noqa: BLE001  (none shown rather than a failed table)
        return []


def _parsed(override: str) -> tuple[str, ...]:
    """An override as Hydra reads it: (edit, key, value); the text where it does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        found = OverridesParser.create().parse_override(override)
    except Exception:  # noqa: BLE001
        return (override,)
    return (str(found.type), found.get_key_element(), repr(found.value()))


def earlier_trials(sweep_dir: Path, job_overrides: list[str]) -> list[Path]:
    """The trial folders of earlier sweeps (siblings of `sweep_dir`) that ran these overrides,
    `ckpt_path` aside: where `ckpt_path=auto` in a rerun of an interrupted sweep finds each
    trial's checkpoints."""

    def key(overrides: list[str]) -> list[str]:
        return sorted(o for o in overrides if not o.startswith("ckpt_path="))

    trials = {saved.parent.parent for saved in sweep_dir.parent.glob("*/*/.hydra/overrides.yaml")}
    own = key(job_overrides)
    return sorted(t for t in trials if t.parent != sweep_dir and key(run_overrides(t)) == own)


def worst_value(direction: str) -> float:
    """What a sweeper should see for a failed trial: the worst possible value."""
    return -math.inf if direction.startswith("max") else math.inf


def write_result(
    output_dir: Path,
    overrides: list[str],
    metric: str | None,
    value: float | None,
    metrics: dict[str, float],
    error: str | None = None,
    status: str | None = None,
) -> None:
    """Record one trial's outcome next to its run folder's other files: `status` ok, failed
    (with `error`'s line) or interrupted (a stop signal: `error` says where it saved)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {
        "overrides": overrides,
        "status": status or ("failed" if error else "ok"),
        "metric": metric,
        "value": value,
        "error": error,
        "metrics": metrics,
    }
    # whole or absent: a parallel sweep's launcher may read it as a stop signal ends the sweep
    write_text_atomic(output_dir / RESULT_FILE, json.dumps(result, indent=1, default=float))


def collect(sweep_dir: Path, direction: str) -> list[dict[str, Any]]:
    """One row per trial folder (`<sweep dir>/<n>/result.json`), best first, failures last."""
    rows = []
    for path in sweep_dir.glob(f"*/{RESULT_FILE}"):
        result = json.loads(path.read_text())
        result["trial"] = int(path.parent.name) if path.parent.name.isdigit() else path.parent.name
        rows.append(result)
    sign = -1.0 if direction.startswith("max") else 1.0

    def order(row: dict[str, Any]) -> tuple[int, float, str]:
        value = row.get("value")
        ok = row["status"] == "ok" and value is not None and math.isfinite(value)
        return (0, sign * value, str(row["trial"])) if ok else (1, 0.0, str(row["trial"]))

    return sorted(rows, key=order)


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]], metric: str | None) -> Table:
    """`summary.md` and `summary.csv` in the sweep folder; returns the table for the console.

    The CSV has a column per override; the table and summary.md one per override that differs
    between trials, and name the ones every trial shares once (a line above, the title): those
    typed for the whole sweep (`shared_overrides`), as typed, and any the trials' rows share."""
    keys = list(dict.fromkeys(k for r in rows for k, _ in _pairs(r["overrides"])))
    values = {k: {dict(_pairs(r["overrides"])).get(k) for r in rows} for k in keys}
    searched = searched_keys(sweep_dir)
    shared = [k for k in keys if len(rows) > 1 and len(values[k]) == 1
              and k.lstrip("+~") not in searched]  # fmt: skip
    typed = shared_overrides(sweep_overrides(sweep_dir))  # (no trial's own: none in rows)
    named = {o.lstrip("+~").split("=", 1)[0] for o in typed}
    every = " ".join([*typed, *(f"{k}={next(iter(values[k]))}" for k in shared if k not in named)])

    def header(columns: list[str]) -> list[str]:
        return ["trial", *columns, metric or "value", "status"]

    def cells(row: dict[str, Any], digits: str, columns: list[str]) -> list[str]:
        """One row; `digits` formats the metric (rounded for people, full for the CSV)."""
        given = dict(_pairs(row["overrides"]))
        value = row.get("value")
        finite = isinstance(value, float) and math.isfinite(value)
        shown = format(value, digits) if finite else ""
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('error')}"
        params = (rounded_value(given.get(k, ""), digits) for k in columns)
        return [str(row["trial"]), *params, shown, status]

    with (sweep_dir / "summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header(keys), *(cells(r, ".17g", keys) for r in rows)])
    varied = [k for k in keys if k not in shared]
    table_rows = [[c or "—" for c in cells(r, ".4g", varied)] for r in rows]
    lines = [f"every trial: `{every}`", ""] if every else []
    lines += ["| " + " | ".join(header(varied)) + " |", "|" + "---|" * len(header(varied))]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in table_rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    title = f"sweep {sweep_dir} — best first" + (f" (every trial: {every})" if every else "")
    table = Table(title=Text(title))  # (Text: `[attn,swa]` is a value, not Rich markup)
    for name in header(varied):
        table.add_column(Text(name), overflow="fold")
    for r in table_rows:
        table.add_row(*map(Text, r))
    return table


def _pairs(overrides: list[str]) -> list[tuple[str, str]]:
    return [tuple(o.split("=", 1)) for o in overrides if "=" in o]


class SweepSummary(Callback):
    """Hydra callback: the sweep's table at the end of a multirun; exit 1 if no trial ran."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_") or ""):
            _plain_optuna_logs()
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config.hydra.overrides.task, sweep_dir / SWEEP_OVERRIDES_FILE)
        RUNNING_SWEEP.update(_table_of(config))
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
        if launcher.endswith(".BasicLauncher"):  # trials run here, one after another
            hold_between_trials()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        table = _table_of(config)
        rows = show_summary(**table)
        sweep_dir = table["sweep_dir"]
        if rows and all(r["status"] != "ok" for r in rows):
            raise SystemExit(
                f"error: all {len(rows)} trials failed (see {sweep_dir / 'summary.md'})"
            )


def _table_of(config: DictConfig) -> dict[str, Any]:
    """`show_summary`'s arguments for the sweep of Hydra's `config`."""
    metric = config.get("optimized_metric")
    direction = OmegaConf.select(config, "hydra.sweeper.direction") or sweep_direction(metric)
    return {"sweep_dir": Path(config.hydra.sweep.dir), "metric": metric, "direction": direction}


RUNNING_SWEEP: dict[str, Any] = {}  # the sweep this process launched: its table's arguments


def show_running_sweep() -> None:
    """The table of the trials so far of the sweep this process launched (a stop signal
    ended it between or before trials, or in the launcher of parallel ones)."""
    if RUNNING_SWEEP:
        show_summary(**RUNNING_SWEEP)


def show_summary(sweep_dir: Path, metric: str | None, direction: str) -> list[dict[str, Any]]:
    """Write and print the table of the sweep's trials so far (none: nothing); its rows."""
    rows = collect(sweep_dir, direction)
    if rows:
        Console(soft_wrap=True, width=console_width()).print(write_summary(sweep_dir, rows, metric))
        print(f"sweep table: {sweep_dir / 'summary.md'} (and summary.csv)")
    return rows


RESUME_SWEEP = "rerun the same command with ckpt_path=auto to go on"


def _plain_optuna_logs() -> None:
    """Optuna's lines as Hydra's sweep lines look (`[optuna] A new study created …`): its own
    handler colours them with escape codes even in a pipe or log file."""
    import logging

    import optuna

    optuna.logging.disable_default_handler()
    logger = logging.getLogger("optuna")
    if not any(h.get_name() == "advarch" for h in logger.handlers):  # once per process
        handler = logging.StreamHandler()
        handler.set_name("advarch")
        handler.setFormatter(logging.Formatter("[optuna] %(message)s"))
        logger.addHandler(handler)
