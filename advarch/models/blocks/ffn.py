"""Position-wise feed-forward networks: GELU MLP and SwiGLU (Shazeer 2020)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advarch.models.blocks.config import BlockConfig, ModelShape


class FeedForward(nn.Module):
    """`gelu`: W2·GELU(W1 x); `swiglu`: W2·(SiLU(W1 x) ⊙ W3 x). Shapes (…, D) → (…, D)."""

    def __init__(
        self, dim: int, hidden: int, activation: str = "gelu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        shape = ModelShape(dim=dim, ffn_hidden=hidden, activation=activation)
        FeedForwardConfig().validate(shape)
        self.activation = activation
        self.w_in = nn.Linear(dim, hidden * (2 if activation == "swiglu" else 1), bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h)
        return self.dropout(self.w_out(h))


@dataclass(frozen=True)
class FeedForwardConfig(BlockConfig):
    """The dense FFN (`dense` in `model.ffn`): no options of its own, only the model's widths."""

    def build(self, shape: ModelShape, causal: bool = True) -> FeedForward:
        """The FFN of a layer of `shape` (position-wise, so causality does not matter)."""
        return FeedForward(shape.dim, shape.hidden, shape.activation, shape.dropout)
