"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019) and a factory by name."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g, computed in at least float32 (stable under autocast;
    float64 stays float64)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        y = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(wide.dtype)).to(x.dtype)


def make_norm(kind: str, dim: int) -> nn.Module:
    """`rmsnorm` or `layernorm` (config key `model.norm`)."""
    if kind == "rmsnorm":
        return RMSNorm(dim)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    raise ValueError(f"model.norm={kind!r} is not one of: rmsnorm, layernorm")
