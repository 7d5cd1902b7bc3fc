"""Save the run when the process is told to stop: SIGTERM, SIGINT (Ctrl-C), SIGUSR1/2.

Schedulers send SIGTERM before preemption; SLURM sends a chosen signal before the time limit
(`--signal=USR1@<s>`; the submitit launcher asks for SIGUSR2). The handler only records the
signal; at the end of the current training batch (after its optimizer step, where periodic
checkpoints are written too) the callback writes `last.ckpt`, prints one line naming it, and
raises `Interrupted`, which the entry point turns into exit code 128 + the signal number
(143 SIGTERM, 130 SIGINT, 138 SIGUSR1, 140 SIGUSR2). Resuming from that checkpoint
(`ckpt_path=auto`) continues exactly where the signal arrived. SIGUSR1/2 inside a SLURM job
also requeue the job (`scontrol requeue`). A second Ctrl-C stops at once, without saving.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE = (signal.SIGUSR1, signal.SIGUSR2)


class Interrupted(Exception):
    """Training stopped on a signal after saving `checkpoint`; exit with `exit_code`."""

    def __init__(self, signum: int, step: int, checkpoint: Path) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        super().__init__(
            f"{signal.Signals(signum).name} at step {step}: saved {checkpoint}; resume with "
            "ckpt_path=auto (same run_name) or ckpt_path=<that file>"
        )


class SignalCheckpoint(L.Callback):
    """Turn SIGTERM / SIGINT / SIGUSR1 / SIGUSR2 during `fit` into a checkpoint and a stop.

    Args:
        path: where to write the checkpoint (the run's `checkpoints/last.ckpt`).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the handlers (Lightning installed its own SIGTERM one at fit start)."""
        self.received = None
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        received = self.received is not None
        if trainer.world_size > 1:  # every rank stops at the same step
            flag = torch.tensor(float(received), device=trainer.strategy.root_device)
            received = bool(trainer.strategy.reduce(flag, reduce_op="max") > 0)
        if not received:
            return
        signum = self.received or signal.SIGTERM
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            print(
                f"{signal.Signals(signum).name} received: saved {self.path} at step "
                f"{trainer.global_step}",
                flush=True,
            )
            if signum in REQUEUE and os.environ.get("SLURM_JOB_ID"):
                subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=False)
        raise Interrupted(signum, trainer.global_step, self.path)
