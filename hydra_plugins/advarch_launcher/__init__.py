"""advarch's Hydra launcher for `hydra/launcher=local_parallel` (a Hydra plugin: Hydra
instantiates launchers only from the `hydra_plugins` package).

Hydra's joblib launcher runs a sweep's trials in parallel worker processes. On a stop signal
(Ctrl-C, SIGTERM) joblib stops by killing its workers (SIGKILL), in the middle of a step or
of writing a checkpoint, and the trials record nothing. `LocalParallelLauncher` holds the
signal instead: the running trials save `last.ckpt` and record `interrupted` rows, no more
trials start, and the sweep then stops with its table (`stop_signals.stop_requests_by_file`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
from joblib import effective_n_jobs

from advarch.stop_signals import (
    spawned_with_signals_blocked,
    stop_request_file,
    stop_requests_by_file,
    sweep_worker_started,
)


class LocalParallelLauncher(JoblibLauncher):
    """Hydra's joblib launcher whose stop signals let the running trials save (module doc).

    Each worker process starts with stop signals blocked, then holds them between trials
    (`sweep_worker_started`: a Ctrl-C reaches every process of the group, idle or starting
    workers too, which died of it and broke the pool), and watches this process, which it
    outlives only to save its trial.
    """

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
               ) -> Sequence[JobReturn]:  # fmt: skip
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.joblib.update(initializer=sweep_worker_started, initargs=(os.getpid(),))
        stop_file = stop_request_file(sweep_dir.resolve())
        spawns = self._spawns()
        blocked = spawned_with_signals_blocked() if spawns else contextlib.nullcontext()
        trials = f"{len(job_overrides)} trial" + ("s" if len(job_overrides) != 1 else "")
        where = f"{effective_n_jobs(self.joblib['n_jobs'])} worker processes" if spawns else (
            "this process, one at a time")  # fmt: skip
        opening = OpeningLine(f"{trials} in {where} (hydra.launcher.n_jobs="
                              f"{self.joblib['n_jobs']})")  # fmt: skip
        with stop_requests_by_file(stop_file), blocked, opening:
            return super().launch(job_overrides, initial_job_idx)

    def _spawns(self) -> bool:
        """Whether joblib runs the trials in processes it spawns: one job at a time, or its
        threading backend, runs them here, where stop signals must stay unblocked."""
        processes = self.joblib.get("backend") in (None, "loky", "multiprocessing")
        return processes and effective_n_jobs(self.joblib["n_jobs"]) > 1


class OpeningLine(logging.Filter, contextlib.AbstractContextManager):
    """While in use, Hydra's joblib launcher opens with `line` instead of every joblib option
    (`Joblib.Parallel(n_jobs=2,backend=loky,…,initializer=<function … at 0x7f…>)`)."""

    LOGGER = "hydra_plugins.hydra_joblib_launcher._core"

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Joblib.Parallel("):
            record.msg, record.args = self.line, ()
        return True

    def __enter__(self) -> OpeningLine:
        logging.getLogger(self.LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger(self.LOGGER).removeFilter(self)
