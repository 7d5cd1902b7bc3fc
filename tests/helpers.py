"""Test-only Lightning callbacks (referenced from configs by `_target_`)."""

from __future__ import annotations

import lightning as L


class CrashAtStep(L.Callback):
    """Raise at the start of optimizer step `step`, like a machine dying mid-run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


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
