"""Stop signals outside training's own handlers (`callbacks.signals`): while the command
imports, builds data and model, or after `fit`. SIGTERM, SIGUSR1 and SIGUSR2 stop it like
Ctrl-C, with one line saying what was saved, and never inside torch's imports (which would
abort the process) nor inside Hydra between a sweep's trials (where it failed in Hydra's own
code, or wrote no table): a sweep holds them there and stops as its next trial starts. A
parallel sweep's launcher (`hydra_plugins.advarch_launcher`) holds them too and asks its
trials, in other processes, to save and stop through a file (`stop_requests_by_file`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from advarch.slurm import STOP_SIGNALS

STOP_REQUEST_FILE = ".stop_requested"  # in a parallel sweep's folder, naming the signal
PHASE = {"training_started": False, "between_trials": False, "sweep_worker": False}
HELD: list[int] = []  # stop signals received between a sweep's trials (`hold_between_trials`)
_LAUNCHER_GONE = threading.Event()  # a parallel sweep's worker outlived its launcher


def training_started(*_: Any) -> None:
    """`on_train_start`: a stop signal from here on comes after training began, whose
    checkpoints are written (`stopped_line` says so)."""
    PHASE["training_started"] = True  # (a function of the module: ddp_spawn pickles callbacks)


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGUSR1/2) where training has no handler of its own
    (`SignalCheckpoint`): before `fit` (imports, data, model) or after it. A BaseException,
    as KeyboardInterrupt is for SIGINT, so that no `except Exception` swallows it. SIGINT too
    out of Lightning's calls (`ddp_launcher`), which turn a KeyboardInterrupt into exit 1."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Stopped(signum)


def _on_stop_signal(signum: int, frame: Any) -> None:
    if PHASE["between_trials"] and not HELD:  # (a second one acts at once: nothing hangs)
        HELD.append(signum)  # (raised as the next trial starts: `trial_running`)
        if not PHASE["sweep_worker"]:  # (a parallel sweep's launcher says what happens)
            name = signal.Signals(signum).name
            print(f"{name} received: the sweep stops as its next trial starts (again: at once)",
                  file=sys.stderr)  # fmt: skip
        return
    raise _stop(signum)


def stop_on_signals() -> None:
    """SIGTERM, SIGUSR1 and SIGUSR2 stop the command like Ctrl-C (they ended it silently, with
    exit code -15, and a SLURM job unrequeued, while data or the model were built)."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _on_stop_signal)


def hold_between_trials(hold: bool = True) -> None:
    """From here on (a sweep whose trials run in this process), a stop signal that comes
    while Hydra prepares the next trial waits for it to start (`trial_running`); `hold`
    False: no longer, and none is held (the sweep is over)."""
    PHASE["between_trials"] = hold
    if not hold:
        HELD.clear()


@contextlib.contextmanager
def trial_running() -> Iterator[None]:
    """One job of the command (a sweep's trial, or the single run): stop signals act at once
    within it; one held since the last trial stops the sweep here, before it starts."""
    between, PHASE["between_trials"] = PHASE["between_trials"], False
    try:
        if HELD:
            raise _stop(HELD[0])
        yield
    finally:
        PHASE["between_trials"] = between


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
def stopping_in_one_line(what: str) -> Iterator[None]:
    """A command's work (eval.py's `what` = "evaluation", generate.py's), stopped by a signal
    in one line and its exit code, `SIGINT received: evaluation stopped`: Ctrl-C as it started
    was a 60-line traceback, and SIGTERM ended it without a word."""
    stop_on_signals()
    try:
        yield
    except (KeyboardInterrupt, Stopped) as err:
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(f"{signal.Signals(signum).name} received: {what} stopped", file=sys.stderr)
        # (an import of torch it stopped leaves torch's loggers at Hydra's INFO: torch's
        # exit-time cache statistics would follow the line)
        logging.getLogger("torch").setLevel(logging.WARNING)
        sys.exit(128 + signum)


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
        raise _stop(received[0])


def stop_request_file(sweep_dir: Path) -> Path:
    """The file through which a parallel sweep's launcher asks its trials to stop."""
    return sweep_dir / STOP_REQUEST_FILE


def requested_stop(path: Path | None) -> int | None:
    """The stop signal the file at `path` names (`stop_requests_by_file`), or None."""
    if path is None:
        return None
    try:
        return signal.Signals[path.read_text().strip()].value
    except (OSError, KeyError):  # (none, or not written whole yet: seen at the next look)
        return None


@contextlib.contextmanager
def stop_requests_by_file(path: Path) -> Iterator[None]:
    """While the block runs (a launcher waiting for trials that run in other processes), the
    first stop signal is held and its name written to `path`: the running trials see it at their
    next step, save and stop, and no trial starts (`requested_stop`); the block then ends and it
    is raised there (KeyboardInterrupt for SIGINT, `Stopped` for the others). A second one is
    raised at once. The file is removed as the block ends.
    """
    held: list[int] = []
    path.unlink(missing_ok=True)  # (one left by a launcher killed before it could remove it)

    def on_signal(signum: int, frame: Any) -> None:
        if held:
            raise _stop(signum)
        held.append(signum)
        from advarch.atomic import write_text_atomic

        name = signal.Signals(signum).name
        write_text_atomic(path, name)
        print(f"{name} received: the running trials save and stop, then the sweep (again: at "
              "once)", file=sys.stderr)  # fmt: skip

    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS} if main else {}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        path.unlink(missing_ok=True)
    if held:
        raise _stop(held[0])


@contextlib.contextmanager
def spawned_with_signals_blocked() -> Iterator[None]:
    """While the block runs, the processes this thread (or a thread it starts) spawns begin
    with the stop signals blocked, as a signal mask passes through fork and exec: a parallel
    sweep's workers, which a Ctrl-C to the group killed in their first moments, before their
    handlers were in (`sweep_worker_started` unblocks them then). This process still takes
    them: a thread started first, with them unblocked, receives them, and Python runs the
    handlers in the main thread as ever (between its bytecodes: joblib's wait polls).

    Python's resource tracker is started first: starting it unblocks SIGINT and SIGTERM
    (`multiprocessing.resource_tracker.ensure_running` up to CPython 3.12), and loky starts
    it as it spawns its first worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    done = threading.Event()
    threading.Thread(target=done.wait, name="advarch-signal-receiver", daemon=True).start()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        done.set()


def launcher_gone() -> bool:
    """Whether this process is a parallel sweep's worker that outlived its launcher (a
    function, not the Event: Hydra's task function is pickled by value for the workers)."""
    return _LAUNCHER_GONE.is_set()


def sweep_worker_started(launcher: int, poll_s: float = 1.0) -> None:
    """A parallel sweep's worker process, as it starts (before any trial): stop signals are
    held between trials, silently (the launcher says what happens), and act within one as in
    any run; and once the `launcher` process is gone (kill -9, which no handler sees, so no
    stop request comes) the worker stops as on SIGTERM — a running trial saves and records its
    row — then ends, where it would wait for work forever, holding its trial's folder. It
    started with stop signals blocked (`spawned_with_signals_blocked`): they act from here."""
    stop_on_signals()
    hold_between_trials()
    PHASE["sweep_worker"] = True
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # (a signal since: held now)

    def watch() -> None:
        while os.getppid() == launcher:  # (a worker outliving it is adopted by another)
            time.sleep(poll_s)
        _LAUNCHER_GONE.set()  # no trial starts from here on; the one running ends the process
        if not PHASE["between_trials"]:
            os.kill(os.getpid(), signal.SIGTERM)  # (it saves and stops)
        while not PHASE["between_trials"]:
            time.sleep(0.1)
        os._exit(128 + signal.SIGTERM)  # (idle, or its trial ended the process already)

    threading.Thread(target=watch, name="advarch-launcher-watch", daemon=True).start()
