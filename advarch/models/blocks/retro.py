"""RETRO chunked cross-attention and neighbour encoder (Borgeaud et al. 2022, §2.4, Fig. 2).

Shape legend: B batch, T time, D model dim, H heads, Dh head dim, m chunk size, L = T // m
chunks, K neighbours per chunk, R neighbour length (retrieved chunk + continuation, 2m).

CCA (eq. 2–3): chunk u's neighbours are attended by the m positions
[u·m + m − 1, (u + 1)·m + m − 1) — the token that completes chunk u and the m − 1 after it —
so retrieval for a chunk never informs a prediction made before the chunk is complete; the
first m − 1 positions attend to nothing (output 0). Implemented by shifting H left by m − 1,
padding, reshaping into L chunks, one batched attention of each chunk's m queries over its
K·R neighbour keys, and shifting back. Relative (rotary) positions align neighbour token j
with chunk token j: query i of an attending chunk sits at m − 1 + i, key j of each neighbour
at j. T need not be a multiple of m (generation prefixes): neighbours must then have
L = T // m chunks, and the trailing partial chunk keeps attending to chunk L − 1.

How a decoder wires it (`cca_layers` are the decoder layers with a CCA sub-layer; RETRO
encodes the neighbours once, at the first of them, conditioned on that layer's states):

    nb_emb = token_embedding(neighbours)              # (B, L, K, R, D), the decoder's table
    nb_pad = neighbours == pad_id                     # (B, L, K, R), True at padding
    enc = None
    for i, layer in enumerate(layers):
        h = h + layer.attn(layer.norm1(h))
        if i in cca_layers:
            if enc is None:
                enc = encoder(nb_emb, h, neighbour_pad_mask=nb_pad)  # (B, L, K, R, D)
            h = h + cca[i](cca_norm[i](h), enc, neighbour_pad_mask=nb_pad)
        h = h + layer.ffn(layer.norm2(h))

With retrieval off (`neighbours` None or K = 0) the encoder returns None and CCA returns
zeros, so the residual stream equals the plain decoder's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advarch.models.blocks.attention import check_heads
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.norm import make_norm
from advarch.models.blocks.rotary import Rotary


def _check_args(dim: int, num_heads: int, rotary: bool, chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"model.retro.chunk_size={chunk_size} must be positive")
    check_heads(dim, num_heads, "model.retro.num_heads")
    if rotary and (dim // num_heads) % 2:
        raise ValueError(f"model.retro.rotary needs an even head dim, got {dim // num_heads}")


class _Attention(nn.Module):
    """Multi-head attention of x over ctx (no causal mask), rotary positions, key padding."""

    def __init__(self, dim: int, num_heads: int, rotary: bool, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(dim // num_heads) if rotary else None

    def forward(
        self,
        x: torch.Tensor,
        ctx: torch.Tensor,
        q_pos: torch.Tensor,
        k_pos: torch.Tensor,
        key_pad: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (N, Tq, D), ctx (N, Tk, D), positions (Tq,), (Tk,), key_pad (N, Tk) -> (N, Tq, D).

        A row whose keys are all padding attends to them uniformly (finite values and
        gradients) and its output is then zeroed: "nothing retrieved" contributes nothing.
        """
        n, tq, d = x.shape
        q = self.to_q(x).view(n, tq, self.num_heads, -1).transpose(1, 2)  # (N, H, Tq, Dh)
        k, v = self.to_kv(ctx).view(n, ctx.shape[1], 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, q_pos), self.rotary(k, k_pos)
        mask = empty = None
        if key_pad is not None:
            empty = key_pad.all(-1)  # (N,)
            mask = ~(key_pad & ~empty[:, None])[:, None, None, :]  # (N, 1, 1, Tk) True = attend
        drop = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        o = self.to_out(o.transpose(1, 2).reshape(n, tq, d))
        return o if empty is None else o.masked_fill(empty[:, None, None], 0.0)


class ChunkedCrossAttention(nn.Module):
    """RETRO's chunked cross-attention (CCA), a residual sub-layer of the decoder.

    Args:
        dim: model width D (decoder and encoded neighbours).
        num_heads: attention heads; must divide dim.
        chunk_size: retrieval chunk length m (the datamodule's `data.retrieval.chunk_size`).
        rotary: relative rotary positions between attending tokens and neighbour tokens.
        dropout: attention dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        chunk_size: int = 64,
        rotary: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_args(dim, num_heads, rotary, chunk_size)
        self.chunk_size = chunk_size
        self.attn = _Attention(dim, num_heads, rotary, dropout)

    def forward(
        self,
        h: torch.Tensor,
        neighbours: torch.Tensor | None,
        *,
        neighbour_pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """h (B, T, D), encoded neighbours (B, L, K, R, D) or None -> (B, T, D).

        Args:
            neighbour_pad_mask: (B, L, K, R) True at neighbour padding (not attended).
        """
        m = self.chunk_size
        b, t, d = h.shape
        if neighbours is None or neighbours.shape[2] == 0 or t < m:
            return torch.zeros_like(h)
        _, num_chunks, k, r, _ = neighbours.shape
        if num_chunks != t // m:
            raise ValueError(f"neighbours carry L={num_chunks} chunks, expected T // m = {t // m}")
        shifted = h[:, m - 1 :]  # (B, T-m+1, D): token u·m+m-1+i is query i of chunk u
        shifted = F.pad(shifted, (0, 0, 0, num_chunks * m - shifted.shape[1]))  # (B, L·m, D)
        q_pos = torch.arange(m - 1, 2 * m - 1, device=h.device)
        k_pos = torch.arange(r, device=h.device).repeat(k)  # (K·R,) same offsets per neighbour
        key_pad = None if neighbour_pad_mask is None else neighbour_pad_mask.reshape(-1, k * r)
        out = self.attn(
            shifted.reshape(b * num_chunks, m, d),
            neighbours.reshape(b * num_chunks, k * r, d),
            q_pos,
            k_pos,
            key_pad,
        )  # (B·L, m, D)
        out = out.reshape(b, num_chunks * m, d)[:, : t - m + 1]
        return F.pad(out, (0, 0, m - 1, 0))  # the first m-1 positions attend to nothing

    def step(
        self,
        h: torch.Tensor,
        neighbours: torch.Tensor,
        query_index: int,
        *,
        neighbour_pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One position h (B, 1, D) as query `query_index` (0..m-1) of the latest completed
        chunk, whose encoded neighbours are (B, 1, K, R, D) -> (B, 1, D): `forward`'s value at
        that position, for incremental decoding."""
        b, _, k, r, d = neighbours.shape
        q_pos = torch.tensor([self.chunk_size - 1 + query_index], device=h.device)
        k_pos = torch.arange(r, device=h.device).repeat(k)
        key_pad = None if neighbour_pad_mask is None else neighbour_pad_mask.reshape(b, k * r)
        return self.attn(h, neighbours.reshape(b, k * r, d), q_pos, k_pos, key_pad)


class _EncoderLayer(nn.Module):
    """Pre-norm self-attention, cross-attention to the chunk, feed-forward (all residual)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        hidden: int,
        activation: str,
        norm: str,
        rotary: bool,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ffn = (make_norm(norm, dim) for _ in range(3))
        self.self_attn = _Attention(dim, num_heads, rotary, dropout)
        self.cross_attn = _Attention(dim, num_heads, rotary, dropout)
        self.ffn = FeedForward(dim, hidden, activation, dropout)


class NeighbourEncoder(nn.Module):
    """RETRO's retrieval encoder: a bidirectional transformer over each neighbour whose layers
    also cross-attend to the decoder states of the chunk the neighbour was retrieved for.

    Args:
        dim: model width D (neighbour token embeddings come from the decoder's table).
        num_heads: attention heads; must divide dim.
        depth: encoder layers (RETRO and Megatron use 2).
        chunk_size: retrieval chunk length m.
        ffn_hidden: feed-forward width (default 4·dim).
        activation: `gelu` or `swiglu`.
        norm: `rmsnorm` or `layernorm`.
        rotary: rotary positions (within a neighbour; neighbour token j ↔ chunk token j).
        dropout: attention and feed-forward dropout.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int = 2,
        chunk_size: int = 64,
        ffn_hidden: int | None = None,
        activation: str = "gelu",
        norm: str = "rmsnorm",
        rotary: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_args(dim, num_heads, rotary, chunk_size)
        if depth <= 0:
            raise ValueError(f"model.retro.encoder_depth={depth} must be positive")
        self.chunk_size = chunk_size
        hidden = ffn_hidden or 4 * dim
        self.context_norm = make_norm(norm, dim)
        self.layers = nn.ModuleList(
            _EncoderLayer(dim, num_heads, hidden, activation, norm, rotary, dropout)
            for _ in range(depth)
        )
        self.final_norm = make_norm(norm, dim)

    def forward(
        self,
        neighbour_emb: torch.Tensor | None,
        chunk_hidden: torch.Tensor,
        *,
        neighbour_pad_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """neighbour_emb (B, L, K, R, D), decoder states (B, T, D) -> (B, L, K, R, D) or None.

        Steps: 1. chunk u's context is decoder positions [u·m, (u+1)·m); 2. per layer,
        self-attention within each neighbour, cross-attention of all K neighbours of chunk u to
        that context (one batch row per chunk), feed-forward; 3. final norm.
        """
        if neighbour_emb is None or neighbour_emb.shape[2] == 0:
            return None
        b, num_chunks, k, r, d = neighbour_emb.shape
        m = self.chunk_size
        if chunk_hidden.shape[1] < num_chunks * m:
            raise ValueError(f"{num_chunks} chunks of {m} need T >= {num_chunks * m} states")
        ctx = self.context_norm(chunk_hidden[:, : num_chunks * m]).reshape(b * num_chunks, m, d)
        x = neighbour_emb.reshape(b * num_chunks * k, r, d)  # one row per neighbour
        pad = None if neighbour_pad_mask is None else neighbour_pad_mask.reshape(-1, r)
        pos_r = torch.arange(r, device=x.device)
        pos_kr, pos_m = pos_r.repeat(k), torch.arange(m, device=x.device)
        for layer in self.layers:
            xn = layer.norm_self(x)
            x = x + layer.self_attn(xn, xn, pos_r, pos_r, pad)
            xc = layer.norm_cross(x).reshape(b * num_chunks, k * r, d)  # (B·L, K·R, D)
            x = x + layer.cross_attn(xc, ctx, pos_kr, pos_m).reshape(-1, r, d)
            x = x + layer.ffn(layer.norm_ffn(x))
        return self.final_norm(x).reshape(b, num_chunks, k, r, d)
