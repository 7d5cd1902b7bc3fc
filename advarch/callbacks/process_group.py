"""`destroy_process_group_at_exit` in every DDP process, spawned workers included."""

from __future__ import annotations

import lightning as L

from advarch.distributed import destroy_process_group_at_exit


class DestroyProcessGroupAtExit(L.Callback):
    """Each DDP process ends its process group before its interpreter shuts down (gloo's
    processes abort at exit otherwise: `advarch.distributed`)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        destroy_process_group_at_exit()
