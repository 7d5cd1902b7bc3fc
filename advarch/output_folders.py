"""The run's (or sweep's) output folder made before Hydra makes it: one line if it cannot be.

Hydra creates `hydra.run.dir` (or the sweep's folder) before any advarch code runs, so a
read-only or missing parent ended the command in a chain of `pathlib.mkdir` tracebacks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class OutputFolder(Callback):
    """Hydra callback: make the run or sweep folder first; `error: cannot write …` if not."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make(config.hydra.sweep.dir, "hydra.sweep.dir")


def _make(folder: str, key: str) -> None:
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        sys.exit(f"error: cannot write {key}={folder}: {reason} (choose another {key})")
