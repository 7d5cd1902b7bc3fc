"""Spawned DDP workers (`ddp_spawn`, `ddp_fork`: `trainer=ddp`, `trainer=ddp_sim`) stop as
one run does.

Lightning's launching process waits for its workers; a stop signal sent to it alone (`kill
<pid>`, a container's stop) never reached them: they trained to the end while it waited, then
it ended with exit code 143 and not a word (no test, no summary). And a worker's stop
(`Interrupted`, once saved) came back as a failed process: Lightning's "Detected
KeyboardInterrupt" and exit code 1 for a Ctrl-C. `StopForwardingLauncher` passes the first
stop signal on through a file (`SignalCheckpoint.launcher_request`: not as a signal, which a
terminal's Ctrl-C has already sent them, and a second Ctrl-C stops at once), and a later one
as the signal itself; the workers save and stop at the same step, and their stop comes back as
a result: the launching process raises the same `Interrupted`, as a single process would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.trainer.call import _interrupt
from lightning.pytorch.trainer.states import TrainerFn
from torch.multiprocessing.spawn import ProcessException

from advarch.atomic import write_text_atomic
from advarch.callbacks.signals import Interrupted, SignalCheckpoint
from advarch.slurm import STOP_SIGNALS
from advarch.stop_signals import Stopped, training_started


def forward_stop_signals(trainer: Any) -> None:
    """Launch `trainer`'s DDP worker processes (if any) through `StopForwardingLauncher`."""
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
    """Lightning's launcher of worker processes whose stop signals reach them (module doc)."""

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        folder = Path(tempfile.mkdtemp(prefix="advarch-stop-"))
        watchers = [c for c in getattr(trainer, "callbacks", []) if isinstance(c, SignalCheckpoint)]
        for watcher in watchers:  # (sent to the workers with the trainer)
            watcher.launcher_request = folder / "stop_requested"
        try:
            with passed_on(folder / "stop_requested", lambda: self.procs) as held:
                try:
                    result = super().launch(_StopAsResult(function), *args, trainer=trainer,
                                            **kwargs)  # fmt: skip
                except ProcessException:  # a worker the signal ended: before its handlers,
                    if not held:  # or at once on a second Ctrl-C
                        raise
                    result = None
        finally:
            for watcher in watchers:
                watcher.launcher_request = None
            shutil.rmtree(folder, ignore_errors=True)
        if isinstance(result, WorkerStopped):  # (its line is printed: where it saved)
            raise Interrupted(result.signum, result.message)
        if len(held) > 1:  # (the workers said how they stopped)
            raise Interrupted(held[-1], f"{signal.Signals(held[-1]).name} again: stopped at once")
        if result is not None and trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            training_started()  # (here too: a stop from here on says its checkpoints are in)
        if held:  # before the workers' handlers, or after their last batch: `stopped_line`
            raise Stopped(held[0])  # (not KeyboardInterrupt: Lightning makes it exit code 1)
        return result


@contextlib.contextmanager
def passed_on(request: Path, workers: Callable[[], list[Any]]) -> Iterator[list[int]]:
    """While the block runs, every stop signal is recorded in the yielded list: the first is
    written to `request` (the workers save and stop at their next step), a later one sent to
    the live `workers()` themselves (a second Ctrl-C: they stop at once)."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # (no handlers there)
        yield held
        return
    here = os.getpid()

    def on_signal(signum: int, frame: Any) -> None:
        held.append(signum)
        if len(held) == 1:  # (also in a forked worker before its own handlers)
            write_text_atomic(request, signal.Signals(signum).name)
        elif os.getpid() == here:
            for worker in workers():
                if worker.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signum)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield held
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
