"""One residual layer: pre-norm sequence mixer, optional cross-attention, pre-norm FFN or MoE.

The mixer (dense attention, sliding-window attention, selective SSM, Mamba-2 SSD) and the FFN
(dense, MoE) are chosen per layer by name, so hybrid stacks are a list in the config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from advarch.models.blocks.attention import Attention
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.norm import make_norm

MIXERS = ("attn", "swa", "ssm", "ssd", "none")
FFNS = ("dense", "moe", "none")


@dataclass
class LayerContext:
    """Per-call inputs shared by every layer of a stack."""

    pad_mask: torch.Tensor | None = None  # (B, T) True at padding
    global_mask: torch.Tensor | None = None  # (B, T) True at global tokens (swa)
    expert_mask: torch.Tensor | None = None  # (E,) or (B, E) True = expert allowed
    memory: torch.Tensor | None = None  # (B, S, D) encoder output (seq2seq)
    memory_pad_mask: torch.Tensor | None = None
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def make_mixer(
    kind: str, dim: int, num_heads: int, causal: bool, dropout: float, cfg: dict
) -> nn.Module | None:
    """Build a sequence mixer by name; `cfg` holds its block options (model.swa / ssm / ssd)."""
    if kind == "attn":
        return Attention(dim, num_heads, causal=causal, dropout=dropout)
    if kind == "swa":
        from advarch.models.blocks.sliding_window import SlidingWindowAttention

        return SlidingWindowAttention(
            dim,
            cfg.get("num_heads", num_heads),
            causal=causal,
            dropout=dropout,
            **{k: v for k, v in cfg.items() if k != "num_heads"},
        )
    if kind == "ssm":
        from advarch.models.blocks.ssm import SelectiveSSM

        return SelectiveSSM(dim, **cfg)
    if kind == "ssd":
        from advarch.models.blocks.ssd import Mamba2

        return Mamba2(dim, **cfg)
    if kind == "none":
        return None
    raise ValueError(f"model.layers: unknown layer {kind!r}; choose from {', '.join(MIXERS)}")


def make_ffn(
    kind: str, dim: int, hidden: int, activation: str, dropout: float, cfg: dict
) -> nn.Module | None:
    """Build a feed-forward sub-layer by name; `cfg` holds model.moe options for `moe`."""
    if kind == "dense":
        return FeedForward(dim, hidden, activation, dropout)
    if kind == "moe":
        from advarch.models.blocks.moe import MoE

        return MoE(dim, hidden, activation=activation, dropout=dropout, **cfg)
    if kind == "none":
        return None
    raise ValueError(f"model.ffn: unknown ffn {kind!r}; choose from {', '.join(FFNS)}")


class Layer(nn.Module):
    """x ← x + mixer(norm(x)); [x ← x + cross(norm(x), memory)]; x ← x + ffn(norm(x))."""

    def __init__(
        self,
        index: int,
        dim: int,
        mixer: nn.Module | None,
        ffn: nn.Module | None,
        norm: str,
        cross: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.index = index
        self.mixer, self.ffn, self.cross = mixer, ffn, cross
        self.takes_global_mask = (
            mixer is not None and "global_mask" in inspect.signature(mixer.forward).parameters
        )
        self.mixer_norm = make_norm(norm, dim) if mixer is not None else None
        self.cross_norm = make_norm(norm, dim) if cross is not None else None
        self.ffn_norm = make_norm(norm, dim) if ffn is not None else None

    def _mix(self, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        kwargs: dict[str, Any] = {"pad_mask": ctx.pad_mask}
        if ctx.global_mask is not None and self.takes_global_mask:
            kwargs["global_mask"] = ctx.global_mask
        return self.mixer(h, **kwargs)

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.ffn_residual(self.cross_residual(self.mixer_residual(x, ctx), ctx), ctx)

    def mixer_residual(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """x + mixer(norm(x)) over a whole sequence (x itself without a mixer)."""
        return x if self.mixer is None else x + self._mix(self.mixer_norm(x), ctx)

    def cross_residual(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """x + cross(norm(x), memory) in seq2seq decoders (x itself elsewhere)."""
        if self.cross is None:
            return x
        y = self.cross(self.cross_norm(x), memory=ctx.memory, memory_pad_mask=ctx.memory_pad_mask)
        return x + y

    def ffn_residual(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """x + ffn(norm(x)), the dense FFN or MoE (x itself without an FFN)."""
        return x if self.ffn is None else x + self._ffn(self.ffn_norm(x), ctx)

    def _ffn(self, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        if not self.is_moe:
            return self.ffn(h)
        y, aux, stats = self.ffn(h, expert_mask=ctx.expert_mask)
        ctx.aux_losses.append(aux)
        ctx.stats.update({f"moe/layer{self.index}/{k}": v for k, v in stats.items()})
        return y

    @property
    def is_moe(self) -> bool:
        return self.ffn is not None and not isinstance(self.ffn, FeedForward)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        return None if self.mixer is None else self.mixer.init_state(batch_size, device, dtype)

    def step(self, x: torch.Tensor, state: Any, ctx: LayerContext) -> tuple[torch.Tensor, Any]:
        """One token (B, 1, D) through the layer, advancing the mixer's recurrent state."""
        x, state = self.mixer_step(x, state)
        return self.ffn_residual(self.cross_residual(x, ctx), ctx), state

    def mixer_step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """`mixer_residual` for one token (B, 1, D), advancing the mixer's state."""
        if self.mixer is None:
            return x, state
        y, state = self.mixer.step(self.mixer_norm(x), state)
        return x + y, state
