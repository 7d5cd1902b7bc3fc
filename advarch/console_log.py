"""How log records look on the console (Hydra's `job_logging`, configs/hydra/default.yaml).

The run's `train.log` keeps every record with its time and logger; the console shows the
message alone, a warning or error with its level in front, and leaves out the announcements
that say nothing about this run (no GPU, no TPU, the seed the config already shows).
"""

from __future__ import annotations

import logging
import re
import sys

LOG_WIDTH = 200  # columns of tables and bars where stdout is not a terminal (Rich assumes 80)


def console_width() -> int | None:
    """The width for Rich output: the terminal's (None), or `LOG_WIDTH` in a pipe or log file,
    where Rich's 80 columns would wrap table headers and metrics mid-word."""
    return None if sys.stdout.isatty() else LOG_WIDTH


# Lightning's device lines when there is no such device, its seed line (each DDP process's),
# its step estimate, its restatement of a batch limit the config shows
# (`Trainer(limit_test_batches=1.0)` was …), its restore lines (advarch's own `resuming <file>
# (step …)` line says it), DDP's start-up lines (each process's rank, a banner of dashes)
_SAID_NOTHING = re.compile(
    r"^(?:[GTH]PU available: False\b|(?:\[rank: \d+\] )?Seed set to \d+$"
    r"|Loading `train_dataloader` to estimate|`Trainer\(\w+=1(?:\.0)?\)` was configured so "
    r"|Restoring states from the checkpoint path|Restored all states from the checkpoint"
    r"|Initializing distributed: GLOBAL_RANK|-{20,}\ndistributed_backend=)"
)


class ConsoleFormatter(logging.Formatter):
    """`message` for INFO and below, `WARNING: message` / `ERROR: message` above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname}: {text}"


class ConsoleNoise(logging.Filter):
    """Drops the records that say nothing about this run from the console (not the log file)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not _SAID_NOTHING.match(record.getMessage())
