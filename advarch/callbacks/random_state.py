"""The global random states in every checkpoint, so that a resumed run draws what the
uninterrupted run draws.

Dropout and MoE router noise draw from the global random states. Lightning keeps none of them
in a checkpoint, and a resumed run is seeded as it starts, so from the resumed step on it drew
the first steps' masks again (another run: final val/loss 5.131777 for 5.131849). Each
checkpoint now holds torch's (CPU, and the process's own CUDA device), numpy's and Python's
states, and a resumed run sets them back as it trains its first batch: at the same point of
the stream as the uninterrupted run, since nothing else between two training batches draws
from them (a `DataLoader`'s worker seeds come from a generator of its own:
`data.sampling.data_loader`). A checkpoint written before that batch (the final one of a
resume with nothing left to train) keeps the loaded states. Each DDP process restores the
states of process 0, which writes the checkpoint, into its own device: every process was
seeded alike and draws alike, each on its own GPU.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def random_states() -> dict[str, Any]:
    """The global random states: torch's (CPU, and the current CUDA device's once CUDA is in
    use), numpy's and Python's."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": _numpy_state(),
        "python": random.getstate(),
    }


def _numpy_state() -> tuple:
    """numpy's legacy global state with its key as a tensor (plain torch types: any numpy reads
    it back, and it loads with `weights_only=True`)."""
    name, key, position, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), cached


def set_random_states(states: dict[str, Any]) -> None:
    """Set the states `random_states` returned, CUDA's into the current device (a GPU run's
    resumed on CPU draws on the CPU alone)."""
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    name, key, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, cached))
    random.setstate(states["python"])


class RandomStateCheckpoint(L.Callback):
    """Saves the global random states with each checkpoint; a run resumed from one sets them
    back before its first training batch (module doc)."""

    def __init__(self) -> None:
        self._resumed: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return random_states() if self._resumed is None else self._resumed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:  # fmt: skip
        if self._resumed is not None:
            set_random_states(self._resumed)
            self._resumed = None
