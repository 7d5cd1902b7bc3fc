"""Checkpoint files written atomically on any local filesystem."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from advarch.atomic import save_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing beside the destination and renaming over it.

    Lightning's own write goes through an fsspec transaction, which writes into TMPDIR and
    moves the file: where TMPDIR is another filesystem (node-local /tmp or /dev/shm on
    clusters) the move is a copy into the destination, and a kill mid-copy leaves an empty or
    truncated `last.ckpt`. Remote paths (`s3://…`) keep Lightning's way.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        save_atomic(checkpoint, Path(path))
