"""Rotary position embeddings (Su et al. 2021, RoFormer eq. 34), rotate-half layout."""

from __future__ import annotations

import torch
from torch import nn


class Rotary(nn.Module):
    """Applies RoPE to `(B, H, T, Dh)` queries/keys at integer positions."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary needs an even head dim, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, Dh); positions: (T,) int. Returns x rotated, same dtype."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # (T, Dh/2)
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
