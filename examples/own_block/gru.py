"""A GRU sequence mixer as an advarch block: a class, its typed config, one line in `BLOCKS`.

Importing this module registers `gru`, so `model.layers=[gru, attn]` builds it like any
advarch mixer, with its options under `model.gru` (checked before any data is read, each bad
value one line naming its key). The model is advarch's own, named from here (`GRUHybridModel`)
so that its config's `_target_` imports the registration first, in training and in every
program that loads the checkpoint (eval, generate, merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from advarch.models import Model
from advarch.models.blocks.config import BlockConfig, Checks, ModelShape
from advarch.models.registry import BLOCKS, Block


class GRUMixer(nn.Module):
    """x (B, T, D) → a GRU's hidden states, projected back to D: left to right, PyTorch's fused
    recurrence (no Python loop over time); one token at a time when decoding (`step`)."""

    def __init__(self, dim: int, hidden_mult: int = 1, num_layers: int = 1) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, hidden_mult * dim, num_layers=num_layers, batch_first=True)
        self.out = nn.Linear(hidden_mult * dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        *,
        pad_mask: torch.Tensor | None = None,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.prefill(x)[0]  # (right padding: after every real token, it changes none)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs of a whole prompt and the hidden state after it."""
        y, state = self.gru(x)
        return self.out(y), state

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        gru = self.gru
        return torch.zeros(gru.num_layers, batch_size, gru.hidden_size, device=device, dtype=dtype)

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token x (B, 1, D) and the state before it → its output and the next state."""
        y, state = self.gru(x, state)
        return self.out(y), state


@dataclass(frozen=True)
class GRUConfig(BlockConfig):
    """`model.gru`: the GRU mixer's options."""

    name: ClassVar[str] = "gru"

    hidden_mult: int = 1  # GRU width as a multiple of model.dim
    num_layers: int = 1  # stacked GRU layers inside one mixer

    def checks(self, shape: ModelShape) -> Checks:
        yield from self.at_least_one("hidden_mult", "num_layers")

    def build(self, shape: ModelShape, causal: bool = True) -> GRUMixer:
        """The mixer of a layer of `shape` (left to right whatever the stack: a recurrence)."""
        return GRUMixer(shape.dim, **self.options())


BLOCKS["gru"] = Block("mixer", GRUMixer, GRUConfig)


class GRUHybridModel(Model):
    """advarch's `Model`; a `_target_` here imports the `gru` registration before it builds."""
