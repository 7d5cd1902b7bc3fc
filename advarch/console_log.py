"""How log records look on the console (Hydra's `job_logging`, configs/hydra/default.yaml).

The run's `train.log` keeps every record with its time and logger; the console shows the
message alone, a warning or error with its level in front, and leaves out the announcements
that say nothing about this run (no GPU, no TPU, the seed the config already shows). What a
run prints besides its records (the run summary, a stop on a signal) goes into `train.log`
too, through `keep_in_log`.
"""

from __future__ import annotations

import datetime
import logging
import re
import sys
import time
from typing import Protocol, runtime_checkable

LOG_WIDTH = 200  # columns of tables and bars where stdout is not a terminal (Rich assumes 80)
PRINTED = "advarch.console"  # the logger of lines the console printed: train.log's copy


@runtime_checkable
class NamesItsRun(Protocol):
    """Console output (a progress bar, the model's table) that names its run where several
    runs print to one console at once: a parallel sweep's trials (`RunIdentity.label`)."""

    run_label: str | None


def progress_line(done: int, total: int, since: float, start: int = 0) -> str:
    """`30/300 · 0:00:19 elapsed, 0:02:51 left`: long work's place for a log, where no bar is
    drawn; `since` is when it started (`time.monotonic()`), at `start` (a resumed run's step)."""
    elapsed = time.monotonic() - since
    left = elapsed / max(done - start, 1) * (total - done)
    clock = [str(datetime.timedelta(seconds=round(t))) for t in (elapsed, left)]
    return f"{done}/{total} · {clock[0]} elapsed, {clock[1]} left"


def console_width() -> int | None:
    """The width for Rich output: the terminal's (None), or `LOG_WIDTH` in a pipe or log file,
    where Rich's 80 columns would wrap table headers and metrics mid-word."""
    return None if sys.stdout.isatty() else LOG_WIDTH


# Lightning's device lines when there is no such device, its seed line (each DDP process's),
# its step estimate, its restatement of a batch limit the config shows
# (`Trainer(limit_test_batches=1.0)` was …), its restore lines (advarch's own `resuming <file>
# (step …)` line says it), DDP's start-up lines (each process's rank, a banner of dashes), its
# `fast_dev_run` announcement (checkpointing suppressed: advarch writes `last.ckpt` all the same)
_SAID_NOTHING = re.compile(
    r"^(?:[GTH]PU available: False\b|(?:\[rank: \d+\] )?Seed set to \d+$"
    r"|Loading `train_dataloader` to estimate|`Trainer\(\w+=1(?:\.0)?\)` was configured so "
    r"|Restoring states from the checkpoint path|Restored all states from the checkpoint"
    r"|Initializing distributed: GLOBAL_RANK|-{20,}\ndistributed_backend="
    r"|`Trainer\.fit` stopped: `max_(?:steps|epochs)=-?\d+` reached\.$"
    r"|Running in `fast_dev_run` mode: "
    r"|Using (?:16bit|bfloat16) Automatic Mixed Precision \(AMP\)$)"
)


def keep_in_log(*lines: str) -> None:
    """Record lines the console printed outside logging (the run summary, a stop line), so
    that `train.log` holds them too; `ConsoleNoise` keeps them off the console (once is enough).
    """
    printed = logging.getLogger(PRINTED)
    for line in lines:
        printed.info(line)


def say(line: str) -> None:
    """Print `line` (flushed: a stopping process's last word) and keep it in `train.log`."""
    print(line, flush=True)
    keep_in_log(line)


def worker_console() -> None:
    """Give a spawned DDP worker (`trainer=ddp_sim`: a fresh interpreter Hydra never configured)
    the launching process's console: messages alone, through `ConsoleNoise`, so that each
    worker's DDP start-up banner stays off it. A process with handlers (Hydra's) keeps its own.
    """
    root = logging.getLogger()
    if root.handlers:
        return
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(ConsoleFormatter("%(message)s"))
    console.addFilter(ConsoleNoise())
    root.addHandler(console)
    root.setLevel(logging.INFO)


class ConsoleFormatter(logging.Formatter):
    """`message` for INFO and below, `WARNING: message` / `ERROR: message` above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname}: {text}"


class ConsoleNoise(logging.Filter):
    """Drops from the console (not the log file) the records that say nothing about this run,
    and the copies of what it printed already."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == PRINTED:
            return False
        return record.levelno > logging.INFO or not _SAID_NOTHING.match(record.getMessage())


class _DropNoise(logging.Filter):
    """Lightning's advertising tips and its `weights_only` notice are noise in a research log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Tip:" not in message and "`weights_only` was not set" not in message


_NOISE = _DropNoise()


def quiet_lightning_logs() -> None:
    """Route Lightning's logs through Hydra's handlers once and silence known noise at source.

    Lightning adds its own console handler on import (so every line would print twice),
    faiss announces which CPU build it loaded, `datasets` draws a bar for every tiny save,
    functorch warns about batching rules it falls back on in the per-example Fisher.
    """
    import datasets
    import lightning  # noqa: F401  (imported now so its console handler exists to be removed)

    from advarch.callbacks.known_warnings import ignore_known_warnings

    datasets.disable_progress_bars()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    ignore_known_warnings()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # logger filters do not apply to records propagated from children: filter at the source
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        logging.getLogger(name).addFilter(_NOISE)  # a no-op when already there
