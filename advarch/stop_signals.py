"""Stop signals outside training's own handlers (`callbacks.signals`): while the command
imports, builds data and model, or after `fit`. SIGTERM, SIGUSR1 and SIGUSR2 stop it like
Ctrl-C, with one line saying what was saved, and never inside torch's imports (which would
abort the process).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

from advarch.slurm import STOP_SIGNALS

PHASE = {"training_started": False}  # where a stop signal without a handler of training's came


def training_started(*_: Any) -> None:
    """`on_train_start`: a stop signal from here on comes after training began, whose
    checkpoints are written (`stopped_line` says so)."""
    PHASE["training_started"] = True  # (a function of the module: ddp_spawn pickles callbacks)


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGUSR1/2) where training has no handler of its own
    (`SignalCheckpoint`): before `fit` (imports, data, model) or after it. A BaseException,
    as KeyboardInterrupt is for SIGINT, so that no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGTERM, SIGUSR1 and SIGUSR2 stop the command like Ctrl-C (they ended it silently, with
    exit code -15, and a SLURM job unrequeued, while data or the model were built)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signum != signal.SIGINT:
                signal.signal(signum, _raise_stopped)


def stopped_line(signum: int, sweep: bool = False) -> str:
    """What a stop outside training's handlers did, for the console. A sweep's launching
    process (`-m`) cannot tell what its trials saved: they say it themselves."""
    from advarch.sweeps import RESUME_SWEEP

    name = signal.Signals(signum).name
    if sweep:
        return f"{name} received: sweep stopped (its trials keep what they saved); {RESUME_SWEEP}"
    if PHASE["training_started"]:
        return f"{name} received after training: stopped (its checkpoints are written)"
    return f"{name} received before training started: stopped, nothing saved"


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold the stop signals until the block ends, then raise there (KeyboardInterrupt for
    SIGINT, `Stopped` for the others).

    Importing torch runs Python callbacks from C++ (pybind11), where an exception raised by a
    signal handler cannot unwind: the process aborts (`terminate called …`, exit -6) instead
    of stopping with one line. Outside the main thread signals cannot be handled: the block
    runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in STOP_SIGNALS}  # fmt: skip
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt if received[0] == signal.SIGINT else Stopped(received[0])
