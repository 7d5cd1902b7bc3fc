"""Dense multi-head attention (Vaswani et al. 2017) through PyTorch's fused SDPA.

Self-attention (causal or bidirectional, rotary positions) and cross-attention over an
encoder memory. Shapes: B batch, T query time, S key time, D model dim, H heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advarch.models.blocks.config import BlockConfig, Checks, ModelShape, heads_check
from advarch.models.blocks.rotary import Rotary


def check_heads(dim: int, num_heads: int, key: str = "model.num_heads") -> int:
    """Per-head width of `dim` over `num_heads`; ValueError naming `key` unless it divides."""
    ok, message = heads_check(dim, num_heads, key)
    if not ok:
        raise ValueError(message)
    return dim // num_heads


class Attention(nn.Module):
    """Multi-head attention; `cross=True` attends from `x` to `memory` instead of itself."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        causal: bool = True,
        rotary: bool = True,
        dropout: float = 0.0,
        cross: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = check_heads(dim, num_heads)
        self.causal = causal and not cross
        self.cross = cross
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(self.head_dim) if rotary and not cross else None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def forward(
        self,
        x: torch.Tensor,
        *,
        pad_mask: torch.Tensor | None = None,
        global_mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, T, D); pad_mask: (B, T) True at padding; memory: (B, S, D) for cross.

        `global_mask` is part of the mixer call contract (`advarch.models.layers.Mixer`) and
        needs nothing here: every token already attends to every allowed key.
        """
        source, source_pad = (memory, memory_pad_mask) if self.cross else (x, pad_mask)
        if source is None:
            raise ValueError("cross-attention needs an encoder memory")
        q, k, v = self._project(x, source, torch.arange(x.shape[1], device=x.device))
        mask = self._mask(x.shape[1], source.shape[1], source_pad, x.device)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal and mask is None,
        )
        return self._merge(out)

    def _project(
        self, x: torch.Tensor, source: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q from x (B, T, D), k and v from source (B, S, D), each (B, H, ·, Dh); rotary at
        `positions` (T,) (self-attention only, so T = S)."""
        q = self._heads(self.q_proj(x))
        k, v = (self._heads(t) for t in self.kv_proj(source).chunk(2, dim=-1))
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """Heads (B, H, T, Dh) → output projection (B, T, D)."""
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def _mask(
        self, t: int, s: int, key_pad: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor | None:
        """Boolean (B|1, 1, T, S) keep-mask, or None when plain causal/full attention suffices."""
        if key_pad is None:
            return None
        keep = ~key_pad[:, None, None, :]  # (B, 1, 1, S)
        if self.causal:
            keep = keep & torch.ones(t, s, dtype=torch.bool, device=device).tril()
        # A query whose every key is padding would give NaN; let it see its own position.
        eye = torch.eye(t, s, dtype=torch.bool, device=device)
        return keep | eye if not self.cross else keep | ~keep.any(-1, keepdim=True)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict:
        """An empty KV cache for incremental decoding."""
        empty = torch.zeros(
            batch_size, self.num_heads, 0, self.head_dim, device=device, dtype=dtype
        )
        return {"k": empty, "v": empty.clone(), "pos": 0}

    def step(self, x: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x: (B, 1, D) the newest token; attends to the cache plus itself."""
        q, k, v = self._project(x, x, torch.tensor([state["pos"]], device=x.device))
        k = torch.cat([state["k"], k], dim=2)
        v = torch.cat([state["v"], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self._merge(out), {"k": k, "v": v, "pos": state["pos"] + 1}

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """A prompt x (B, T, D) in one causal pass → (B, T, D) and the KV cache after it.

        The cache holds the prompt's rotated keys and values at positions 0..T−1, exactly
        what T calls of `step` would have appended, so decoding continues at position T.
        """
        q, k, v = self._project(x, x, torch.arange(x.shape[1], device=x.device))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._merge(out), {"k": k, "v": v, "pos": x.shape[1]}


@dataclass(frozen=True)
class AttentionConfig(BlockConfig):
    """Dense attention (`attn` in `model.layers`): `model.num_heads` heads, no own options."""

    def checks(self, shape: ModelShape) -> Checks:
        yield shape.heads_check()

    def build(self, shape: ModelShape, causal: bool = True) -> Attention:
        """The self-attention mixer of a layer of `shape`."""
        return Attention(shape.dim, shape.num_heads, causal=causal, dropout=shape.dropout)
