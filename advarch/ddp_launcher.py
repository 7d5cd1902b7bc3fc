"""Spawned DDP workers (`ddp_spawn`: `trainer=ddp`, `trainer=ddp_sim`) stop as one run does.

Lightning's launching process waits for its workers; a stop signal sent to it alone (`kill
<pid>`, a container's SIGTERM to its first process) never reached them: they trained to the
end while it waited, then it ended with exit code 143 and not a word (no test, no summary).
And a worker's stop (`Interrupted`, once saved) came back as a failed process: Lightning's
"Detected KeyboardInterrupt" and exit code 1 for a Ctrl-C. `StopForwardingLauncher` passes
its stop signals on to the workers through a file (`stop_signals.stop_requests_by_file`: not
as signals, which a Ctrl-C from a terminal already sent them, and a second is "stop at
once"); they save and stop at the same batch (`SignalCheckpoint`), and their stop comes back
as a result: the launching process raises the same `Interrupted`, as a single process would.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.trainer.states import TrainerFn
from torch.multiprocessing.spawn import ProcessException

from advarch.callbacks.signals import Interrupted, SignalCheckpoint
from advarch.stop_signals import stop_exception, stop_requests_by_file, training_started


def forward_stop_signals(trainer: Any) -> None:
    """Launch `trainer`'s spawned DDP workers (if any) through `StopForwardingLauncher`."""
    launcher = trainer.strategy.launcher
    if type(launcher) is _MultiProcessingLauncher:
        launcher = StopForwardingLauncher(launcher._strategy, launcher._start_method)
        trainer.strategy._launcher = launcher


class WorkerStopped(NamedTuple):
    """A worker's `Interrupted`, returned rather than raised (a raise fails the process); a
    named tuple: Lightning's `move_data_to_device` refuses frozen dataclasses."""

    signum: int
    message: str


class _StopAsResult:
    """Runs the trainer function in a worker; its `Interrupted` ends it as Lightning ends a
    single process's (callbacks' `on_exception`, loggers finalized) and returns `WorkerStopped`."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.function(*args, **kwargs)
        except Interrupted as err:
            trainer = self.function.__self__  # (a Trainer's `_fit_impl`, `_test_impl` …)
            _interrupt(trainer, err)
            trainer._teardown()
            return WorkerStopped(err.signum, str(err))


class StopForwardingLauncher(_MultiProcessingLauncher):
    """Lightning's launcher of spawned workers whose stop signals reach them (module doc)."""

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        folder = Path(tempfile.mkdtemp(prefix="advarch-stop-"))
        watchers = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, SignalCheckpoint)]
        for watcher in watchers:  # (sent to the workers with the trainer)
            watcher.launcher_request = folder / "stop_requested"
        try:
            with stop_requests_by_file(folder / "stop_requested", announce=None) as held:
                try:
                    result = super().launch(_StopAsResult(function), *args, trainer=trainer,
                                            **kwargs)  # fmt: skip
                except ProcessException:  # a worker the signal ended before its handlers
                    if not held:
                        raise
                    raise stop_exception(held[0]) from None
                if isinstance(result, WorkerStopped):
                    raise Interrupted(result.signum, result.message)
                if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
                    training_started()  # (here too: a stop after it says its checkpoints are in)
            return result  # (a signal after the workers' last batch: raised as the block ends)
        finally:
            for watcher in watchers:
                watcher.launcher_request = None
            shutil.rmtree(folder, ignore_errors=True)
