"""Test-only Lightning callbacks (referenced from configs by `_target_`)."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path

import lightning as L


class CrashAtStep(L.Callback):
    """Raise at the start of optimizer step `step`, like a machine dying mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class CrashInValidation(L.Callback):
    """Raise after the first batch of `fit`'s validation at optimizer step `step`, like a
    machine dying there."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_validation_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            raise RuntimeError(f"simulated crash in the validation at step {self.step}")


class IdleSteps(L.Callback):
    """Sleep `seconds` after every optimizer step: a long run that leaves the CPU to others."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


class PoisonLossAtStep(L.Callback):
    """Make every parameter NaN at step `step`, so the next loss is not finite."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object
    ) -> None:
        if trainer.global_step == self.step:
            for p in pl_module.parameters():
                p.data.fill_(float("nan"))


class SignalAtStep(L.Callback):
    """Send this process `signum` (`times` times) once optimizer step `step` is done (9 =
    kill -9: no cleanup)."""

    def __init__(self, step: int, signum: int = 9, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class SignalLauncherAtStep(L.Callback):
    """In a DDP worker of rank 0, send the launching process `signum` (`times` times, 0.2 s
    apart: `kill <pid>` twice) once optimizer step `step` is done, and wait for it to be
    passed on (so the run stops at that step)."""

    def __init__(self, step: int, signum: int, times: int = 1) -> None:
        self.step, self.signum, self.times = step, signum, times

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero:
            for sent in range(self.times):
                time.sleep(0.2 if sent else 0.0)
                os.kill(os.getppid(), self.signum)
            time.sleep(1.0)


class SignalAtBatch(L.Callback):
    """Send this process `signum` once training batch `batch` (counted over the whole run) is
    done: with gradient accumulation, a batch that steps no optimizer."""

    def __init__(self, batch: int, signum: int) -> None:
        self.batch, self.signum = batch, signum

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class SignalAtEpochEnd(L.Callback):
    """Send this process `signum` in the end hooks of epoch `epoch` (where a task stream
    evaluates its tasks)."""

    def __init__(self, epoch: int, signum: int) -> None:
        self.epoch, self.signum = epoch, signum

    def on_train_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), self.signum)


class SignalOnException(L.Callback):
    """Send this process `signum` as the run stops on an exception (while its loggers finish)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_exception(self, trainer: L.Trainer, *args: object) -> None:
        os.kill(os.getpid(), self.signum)


class SignalAtTestBatch(L.Callback):
    """Send this process `signum` after the first test batch."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_test_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if args[-1] == 0:  # batch_idx
            os.kill(os.getpid(), self.signum)


class SignalAtSanityCheck(L.Callback):
    """Send this process `signum` after the first batch of fit's sanity validation (Lightning
    has registered its own SIGTERM handler by then)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_validation_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.sanity_checking and args[-1] == 0:  # batch_idx
            os.kill(os.getpid(), self.signum)


class SignalInValidation(L.Callback):
    """Send this process `signum` after the first batch of `fit`'s validation at optimizer
    step `step` (None: its last step, where no training batch end follows)."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        self.signum, self.step = signum, step

    def on_validation_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        step = trainer.max_steps if self.step is None else self.step
        if trainer.global_step == step and not trainer.sanity_checking and args[-1] == 0:
            os.kill(os.getpid(), self.signum)  # (args[-1]: batch_idx)


class StuckInNativeCode(L.Callback):
    """After training batch `batch`, write the file `ready` and spend about a minute in one
    native call that releases the GIL (PBKDF2): the main thread runs no Python meanwhile, so
    no signal handler either, as in one long attention backward."""

    def __init__(self, ready: str, batch: int = 1) -> None:
        self.ready, self.batch = Path(ready), batch

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == self.batch:
            self.ready.write_text("stuck")
            hashlib.pbkdf2_hmac("sha256", b"advarch", b"salt", 200_000_000)


class RecordBlockedSignals(L.Callback):
    """Append the names of the signals this process's main thread blocks, as training starts,
    to the file at `path` (one line a process)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, *args: object) -> None:
        import signal

        blocked = sorted(
            signal.Signals(s).name for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        )
        with open(self.path, "a") as f:
            f.write(" ".join(blocked) + "\n")


class CtrlCAsWorkersStart(L.Callback):
    """A Ctrl-C from a terminal (to the launching process and its spawned DDP
    workers) while the workers start, before their handlers are in: as a worker unpickles its
    trainer, the first one to do so sends SIGINT to its launching process and to itself."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if os.environ.get("LOCAL_RANK") is None:  # (a spawned worker, as it starts)
            try:
                os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
