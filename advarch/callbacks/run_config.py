"""The run's whole config as the hyperparameters of every logger but W&B (which has it from
`wandb.init`): CSV's `hparams.yaml`, TensorBoard's hparams."""

from __future__ import annotations

from typing import Any

import lightning as L


class LogRunConfig(L.Callback):
    """Log `config` where Lightning logs a module's hyperparameters: at fit start, in every
    process (spawned DDP workers write their own logs).

    Args:
        config: the run's `tracking.tracker_config` (resolved config, parameter counts, code
            version, data fingerprint).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if type(logger).__name__ != "WandbLogger":
                logger.log_hyperparams(self.config)
