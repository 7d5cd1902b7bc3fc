"""Save the run when the process is told to stop: SIGTERM, SIGINT (Ctrl-C), SIGUSR1/2.

Schedulers send SIGTERM before preemption; SLURM sends a chosen signal before the time limit
(`--signal=USR1@<s>`; the submitit launcher asks for SIGUSR2). The handler only records the
signal; at the end of the current training batch (after its optimizer step, where periodic
checkpoints are written too; after the step's validation where one is due, as Lightning's
checkpoints after a validation; at a validation's end when heard during it, where no
accumulation is half done; as the next epoch starts when heard at an epoch's last batch or in
its end hooks, which then have logged its aggregates) the callback writes `last.ckpt`, prints
one line naming it, and raises `Interrupted`, which the entry point turns into exit code 128 +
the signal number (143 SIGTERM, 130 SIGINT, 138 SIGUSR1, 140 SIGUSR2). Resuming from that checkpoint
(`ckpt_path=auto`) continues exactly where the signal arrived: its curves, best checkpoint and
early stopping are the uninterrupted run's. SIGUSR1/2 inside a SLURM job
also requeue the job (`scontrol requeue`). A second Ctrl-C stops at once, without saving.
Validation or testing outside `fit` (train.py's final test, eval.py) stops after the current
batch with one line and the same exit code: nothing to save there, and no metrics written. A
signal during `fit`'s start (data setup, checkpoint restore, sanity validation) stops the run
when training would start, with one line and the same exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from advarch.console_log import say
from advarch.slurm import STOP_SIGNALS, requeue
from advarch.stop_signals import requested_stop


def _ours(handler: Any) -> bool:
    return isinstance(getattr(handler, "__self__", None), SignalCheckpoint)


def _not_ours(signum: int, handler: Any) -> Any:
    """`handler`, or the default one where it is a `SignalCheckpoint`'s (never left behind)."""
    if _ours(handler):
        return signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
    return handler


class Interrupted(Exception):
    """The run stopped on signal `signum` (its line is printed); exit with `exit_code`."""

    def __init__(self, signum: int, message: str) -> None:
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(message)


class SecondCtrlC:
    """A second Ctrl-C that stops the process even inside one long native operation.

    CPython runs a signal handler only between bytecodes: during one long native call (an
    attention backward over 100k tokens) the first Ctrl-C and the second waited for it, for
    minutes. A thread reads the signal numbers the interpreter's C-level handler writes to a
    wakeup socket (`signal.set_wakeup_fd`) as they arrive; a Ctrl-C after an earlier one (a
    terminal's Ctrl-C reaches every process of the group at once: a burst counts once) that
    the Python handler has not acted on within `grace_s` prints `line()` and ends the process
    with exit code 130. Forked children (DataLoader workers) write to no wakeup socket.
    """

    BURST_S = 0.3  # signals closer than this are one keypress reaching several processes

    def __init__(self, line: Callable[[], str], grace_s: float = 1.0) -> None:
        self.line, self.grace_s = line, grace_s
        self.handled = False  # the Python handler acted on the second Ctrl-C
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._previous_fd = -1

    def start(self) -> None:
        """Watch from now (the main thread only: where `set_wakeup_fd` may be called)."""
        if self._sockets is not None or threading.current_thread() is not threading.main_thread():
            return
        reader, writer = socket.socketpair()
        writer.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        _WAKEUP_FDS.add(writer.fileno())
        self._sockets, self.handled = (reader, writer), False
        threading.Thread(target=self._watch, args=(self._sockets,), daemon=True).start()

    def stop(self) -> None:
        """Stop watching; the wakeup fd from before `start` is put back."""
        if self._sockets is None or threading.current_thread() is not threading.main_thread():
            return
        signal.set_wakeup_fd(self._previous_fd)
        reader, writer = self._sockets
        _WAKEUP_FDS.discard(writer.fileno())
        with contextlib.suppress(OSError):  # (the thread's recv returns, whatever forked
            reader.shutdown(socket.SHUT_RDWR)  # workers hold copies of the fds: it ends)
        for sock in (reader, writer):
            sock.close()
        self._sockets = None

    def _watch(self, sockets: tuple[socket.socket, socket.socket]) -> None:
        reader, first = sockets[0], None  # (when the first Ctrl-C came)
        while True:
            try:
                received = reader.recv(64)
            except OSError:
                return
            if not received:
                return
            now = time.monotonic()
            if signal.SIGINT not in received:
                continue
            if first is None or now - first < self.BURST_S:
                first = first or now
                continue
            time.sleep(self.grace_s)  # the Python handler's turn, where it can run
            if self._sockets is not sockets or self.handled:  # (stopped, or a later start's)
                return
            say(self.line())
            sys.stderr.flush()
            os._exit(128 + signal.SIGINT)  # (no cleanup can run while the op holds the thread)


_WAKEUP_FDS: set[int] = set()  # the wakeup sockets `SecondCtrlC` watches in this process


def _no_wakeup_fd_in_child() -> None:
    """A forked child (a DataLoader worker) has no watching thread: its signals must not be
    counted by the parent's. Another wakeup fd (asyncio's) stays."""
    if threading.current_thread() is threading.main_thread():
        previous = signal.set_wakeup_fd(-1)
        if previous not in _WAKEUP_FDS:
            signal.set_wakeup_fd(previous)


os.register_at_fork(after_in_child=_no_wakeup_fd_in_child)


ACKNOWLEDGE_AFTER_S = 1.0  # a stop not saved by then is said to be coming


class SignalCheckpoint(L.Callback):
    """Turn SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 into a checkpoint and a stop during `fit`,
    and into a stop during validation or testing outside it.

    Args:
        path: where to write the checkpoint (the run's `checkpoints/last.ckpt`); None where
            nothing trains (eval.py).
        stop_request: a file whose appearance stops the run as the signal it names would (a
            parallel sweep's launcher writes it: `stop_signals.stop_requests_by_file`). Such a
            trial leaves requeueing a SLURM job to its launcher, once every trial has saved
            (`scontrol requeue` ends the whole job, the other trials with it).
    """

    run_label: str | None = None  # a sweep trial's name, before its lines (`NamesItsRun`)

    def __init__(self, path: Path | None = None, stop_request: Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.stop_request = stop_request
        self.launcher_request: Path | None = None  # the same from spawned DDP workers' launching
        # process, of its own signals (`ddp_launcher`): it requeues a SLURM job as ever
        self.received: int | None = None
        self.saved = False  # on the signal (a second Ctrl-C while the run winds down says so)
        self._stop_after_validation: int | None = None  # the signal, where its step validates
        self._stop_at_next_epoch: int | None = None  # the signal, at an epoch's last batch
        self._previous: dict[int, Any] = {}
        self._watch = SecondCtrlC(self._stopped_at_once)
        self._acknowledges = False  # a signal in training, in the first process: said soon
        self._acknowledgement: threading.Timer | None = None  # (a lock: set only once heard)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:  # a second Ctrl-C
            self._watch.handled = True
            self._cancel_acknowledgement()
            say(self._stopped_at_once())
            raise Interrupted(signum, "stopped at once on a second Ctrl-C")
        if self.received is None and self._acknowledges:
            self._acknowledgement = threading.Timer(ACKNOWLEDGE_AFTER_S, self._acknowledge,
                                                    (signum,))  # fmt: skip
            self._acknowledgement.daemon = True
            self._acknowledgement.start()
        self.received = signum

    def _cancel_acknowledgement(self) -> None:
        if self._acknowledgement is not None:
            self._acknowledgement.cancel()

    def _acknowledge(self, signum: int) -> None:
        """Say that the signal was heard where the step it waits for is long (a step of many
        accumulated batches: silent, a user pressed Ctrl-C again and lost the save). From a
        timer thread (cancelled by the save or a second Ctrl-C): no print inside a handler."""
        if not self.saved and self._acknowledges:  # (not a stop once training ended)
            again = " (Ctrl-C again: at once, without saving)" if signum == signal.SIGINT else ""
            self._say(f"{signal.Signals(signum).name} received: saving when this step ends{again}")

    def _say(self, line: str) -> None:
        """`say` a line naming no file, after the trial it is of (a parallel sweep's trials
        share one console)."""
        say(f"{self.run_label} · {line}" if self.run_label else line)

    def _stopped_at_once(self) -> str:
        saved = f"{self.path} is saved" if self.saved else "without saving"
        return f"SIGINT again: stopped at once, {saved}"

    def _install(self) -> None:
        """Our handlers replace Lightning's (its SIGTERM one, installed when a trainer function
        starts, ends the process with exit code 0 and no word); the handlers from before the
        first install are the ones restored."""
        if not self._previous:
            self._watch.start()
        for signum in STOP_SIGNALS:
            self._previous.setdefault(signum, signal.signal(signum, self._handle))

    def _restore(self, trainer: L.Trainer) -> None:
        """Put back the handlers from before the first install, also in what Lightning's
        teardown will put back: it found ours when `fit` started (`setup` installs them
        before), and left them installed after the run, to catch the next Ctrl-C for a
        callback whose run was over."""
        originals = getattr(getattr(trainer, "_signal_connector", None), "_original_handlers", {})
        for signum, handler in originals.items():
            if _ours(handler):
                originals[signum] = _not_ours(signum, self._previous.get(signum, handler))
        for signum, handler in self._previous.items():
            signal.signal(signum, _not_ours(signum, handler))
        if self._previous:
            self._watch.stop()
        self._previous.clear()
        self._cancel_acknowledgement()  # (the run ended another way: an exception, its end)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """From the start of `fit` (data setup, checkpoint restore, sanity validation)."""
        if stage == "fit":
            self.received, self.saved, self._stop_at_next_epoch = None, False, None
            self._install()
            # last: a stop saves what every other callback did at that batch or validation
            # (the checkpoint callbacks' best-k, early stopping's count)
            trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # over the SIGTERM handler Lightning registered just before

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()
        signum = self._received(trainer)
        if signum is None:
            self._acknowledges = trainer.is_global_zero and self.path is not None
            return
        where = "the run resumes from its checkpoint" if trainer.ckpt_path else "nothing trained"
        message = f"{signal.Signals(signum).name} received before training started: {where}"
        if trainer.is_global_zero:
            self._say(f"{message}, nothing saved")
        raise Interrupted(signum, message)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._acknowledges = False
        self._restore(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore(trainer)  # (no teardown hook follows an exception)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_after_validation = None
        signum = self._received(trainer)
        if signum is None:
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        if epoch_loop._should_accumulate():  # no optimizer step yet: stop after the one due
            return
        if epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            # validation follows this step: save after it (the resume skips it), see
            # `on_validation_end`; were it skipped after all, the next batch's end saves
            self._stop_after_validation = signum
            return
        if epoch_loop._num_ready_batches_reached():
            # the epoch's last batch: save once its end hooks have run (its training aggregates
            # row; Lightning resumes such a checkpoint in the next epoch, skipping them)
            self._stop_at_next_epoch = signum
            return
        self._save_and_stop(trainer, signum, log_step=True)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Save a signal heard at the previous epoch's last batch or in its end hooks (a task
        boundary's evaluation) before this epoch trains."""
        signum = self._stop_at_next_epoch or self._received(trainer)
        self._stop_at_next_epoch = None
        if signum is not None:
            self._save_and_stop(trainer, signum)

    def _save_and_stop(self, trainer: L.Trainer, signum: int, log_step: bool = False) -> None:
        """Write `last.ckpt`, say so and raise `Interrupted`; `log_step`: log this step's
        metrics, which Lightning logs after the batch-end hooks (the loggers save on a stop)."""
        self._cancel_acknowledgement()
        trainer.save_checkpoint(self.path)
        self.saved = True
        if log_step:
            trainer._logger_connector.update_train_step_metrics()
        if trainer.is_global_zero:
            name = signal.Signals(signum).name
            say(f"{name} received: saved {self.path} at step {trainer.global_step}")
            self._requeue(signum)
        raise Interrupted(
            signum,
            f"{signal.Signals(signum).name} at step {trainer.global_step}: saved {self.path}; "
            "resume with ckpt_path=auto (same run_name) or ckpt_path=<that file>",
        )

    def _requeue(self, signum: int) -> None:
        if self.stop_request is None:  # (else a parallel sweep's trial: see `stop_request`)
            requeue(signum)

    def _received(self, trainer: L.Trainer) -> int | None:
        """The signal received or requested (`stop_request`), agreed by every process (they
        stop at the same batch)."""
        # (a request is not `self.received`: a Ctrl-C after it is a first Ctrl-C, which saves)
        signum = (self.received or requested_stop(self.stop_request)
                  or requested_stop(self.launcher_request))  # fmt: skip
        received = signum is not None
        if trainer.world_size > 1:
            flag = torch.tensor(float(received), device=trainer.strategy.root_device)
            received = bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)
        return (signum or signal.SIGTERM) if received else None

    # -- validation and testing outside fit -------------------------------------------------
    def _evaluating_alone(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn != TrainerFn.FITTING

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._evaluating_alone(trainer):
            self._stop_if_fit_was_signalled(trainer, "validation")
            self._install()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_fit_was_signalled(trainer, "testing")
        self._install()

    def _stop_if_fit_was_signalled(self, trainer: L.Trainer, stage: str) -> None:
        """A signal that came after `fit`'s last batch (in its final validation, where no
        batch end follows) stops the run before `stage`: fit has saved its final state."""
        self._stop(trainer, "received at the end of training: {stage} not run", stage, True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._evaluating_alone(trainer):
            self._restore(trainer)
        elif not trainer.sanity_checking:
            # a signal heard during the validation stops here too, not a whole step later,
            # unless it validated in the middle of an accumulation (the step's end saves)
            accumulating = trainer.fit_loop.epoch_loop._should_accumulate()
            signum = self._stop_after_validation or (
                None if accumulating else self._received(trainer)
            )
            self._stop_after_validation = None
            fit_ends = trainer.should_stop and trainer.fit_loop._can_stop_early
            if signum is not None and not fit_ends:
                self._save_and_stop(trainer, signum)
            # else fit ends here (its last step, early stopping): it saves the final state,
            # and the signal stops the run before testing

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._evaluating_alone(trainer):
            self._stop_evaluation(trainer, "validation")

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_evaluation(trainer, "testing")

    def _stop_evaluation(self, trainer: L.Trainer, stage: str) -> None:
        self._stop(trainer, "received: {stage} stopped, no {stage} metrics written", stage)

    def _stop(self, trainer: L.Trainer, what: str, stage: str, requeued: bool = False) -> None:
        """Where a signal was received: one line (`what`, then where the trained weights are)
        and `Interrupted`; `requeued`: a SLURM job asks to run again (to test)."""
        signum = self._received(trainer)
        if signum is None:
            return
        message = f"{signal.Signals(signum).name} {what.format(stage=stage)}"
        if self.path is not None and self.path.is_file():
            message += f"; the trained weights are in {self.path} (eval.py ckpt_path=<it>)"
        if trainer.is_global_zero:
            say(message)
            if requeued:
                self._requeue(signum)
        raise Interrupted(signum, message)
