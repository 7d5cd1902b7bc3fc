"""Lightning's W&B logger without the two warnings it makes W&B ≥ 0.22 print.

Lightning passes `anonymous=None` to `wandb.init` (no effect; W&B warns on every run), and
calls `wandb.require("service")` each time the logger is pickled: `ddp_spawn` pickles it for
every worker of every stage, and W&B, for which the call is a no-op now, warned twice per stage.
"""

from __future__ import annotations

from typing import Any

import wandb
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    """`lightning.pytorch.loggers.WandbLogger` without `anonymous` and the `require` call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)

    def __getstate__(self) -> dict[str, Any]:
        require, wandb.require = wandb.require, lambda *requirements: None
        try:
            return super().__getstate__()
        finally:
            wandb.require = require
