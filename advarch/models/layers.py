"""One residual layer: pre-norm sequence mixer, optional cross-attention, pre-norm FFN or MoE,
and the call contracts of what goes in it.

The mixer (dense attention, sliding-window attention, selective SSM, Mamba-2 SSD) and the FFN
(dense, MoE) are chosen per layer by name from the registry (`advarch/models/registry.py`), so
hybrid stacks are a list in the config. Every mixer is called one way (`Mixer`); an FFN that
routes tokens to experts (`RoutedFFN`) also takes the expert mask and reports aux loss and stats.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from advarch.models.blocks.norm import make_norm


class Mixer(Protocol):
    """Every sequence mixer: (B, T, D) → (B, T, D), masks as keywords, one-token decoding.

    `pad_mask` (B, T) is True at padding; `global_mask` (B, T) True at global tokens, which only
    sliding-window attention needs (dense attention already sees every key, a recurrence has no
    window to reach beyond). `prefill` runs a whole prompt (B, T, D) in the sequence-parallel
    form and returns its output with the decoding state after it: the state T calls of `step`
    from `init_state` would reach, so decoding goes on from a prompt in one pass.
    """

    def __call__(
        self,
        x: torch.Tensor,
        *,
        pad_mask: torch.Tensor | None = None,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any: ...

    def step(self, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]: ...


@runtime_checkable
class RoutedFFN(Protocol):
    """A feed-forward sub-layer that routes tokens to experts (`MoE`).

    Called with the expert mask ((E,) or (B, E) bool, True = allowed) and the padding mask
    ((B, T) bool, True at padding: no loss, statistic or capacity for those tokens); returns
    the output, its weighted aux loss and detached stats. Expert-indexed tensors are named by
    `expert_tensors` (row i is expert i); `update_routing_bias` runs once per optimizer step.
    """

    num_experts: int

    def __call__(
        self,
        x: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...

    def expert_tensors(self) -> dict[str, torch.Tensor]: ...

    def update_routing_bias(self) -> None: ...


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


class Layer(nn.Module):
    """x ← x + mixer(norm(x)); [x ← x + cross(norm(x), memory)]; x ← x + ffn(norm(x))."""

    def __init__(
        self,
        index: int,
        dim: int,
        mixer: Mixer | None,
        ffn: nn.Module | None,
        norm: str,
        cross: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.index = index
        self.mixer, self.ffn, self.cross = mixer, ffn, cross
        self.is_moe = isinstance(ffn, RoutedFFN)  # MoE: takes the expert mask, adds aux loss
        self.mixer_norm = make_norm(norm, dim) if mixer is not None else None
        self.cross_norm = make_norm(norm, dim) if cross is not None else None
        self.ffn_norm = make_norm(norm, dim) if ffn is not None else None

    def forward(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        return self.ffn_residual(self.cross_residual(self.mixer_residual(x, ctx), ctx), ctx)

    def mixer_residual(self, x: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
        """x + mixer(norm(x)) over a whole sequence (x itself without a mixer)."""
        if self.mixer is None:
            return x
        return x + self.mixer(
            self.mixer_norm(x), pad_mask=ctx.pad_mask, global_mask=ctx.global_mask
        )

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
        y, aux, stats = self.ffn(h, expert_mask=ctx.expert_mask, pad_mask=ctx.pad_mask)
        ctx.aux_losses.append(aux)
        ctx.stats.update({f"moe/layer{self.index}/{k}": v for k, v in stats.items()})
        return y

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

    def prefill(self, x: torch.Tensor, ctx: LayerContext) -> tuple[torch.Tensor, Any]:
        """A prompt (B, T, D) through the layer in one pass, and the mixer's state after it
        (what `step` over the prompt's tokens gives; FFN and MoE act per token)."""
        x, state = self.mixer_prefill(x)
        return self.ffn_residual(self.cross_residual(x, ctx), ctx), state

    def mixer_prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """`mixer_residual` over a prompt (B, T, D), with the mixer's state after it."""
        if self.mixer is None:
            return x, None
        y, state = self.mixer.prefill(self.mixer_norm(x))
        return x + y, state
