"""Tiled band attention with a hand-written backward: the blocked kernel of `sliding_window`.

Queries are cut into N blocks of b; block n scores against one window of W = (lb + 1 + rb)·b
consecutive keys (its own block and lb / rb neighbour blocks) plus G global key columns, masked
to the exact key set, then softmax and the values. The work runs a tile of blocks at a time, so
no step allocates a T·W-sized tensor. On CPU that halves the time at long T: a fresh buffer of
hundreds of MB is page-faulted in on every call (as long as a matmul takes), while a tile of a
few MB comes from the allocator's heap and stays in cache for the mask and softmax passes. The
backward pass reuses the forward's probabilities up to ``KEEP_BYTES`` a call (O(T·w) memory,
like autograd) and beyond that recomputes them tile by tile, as FlashAttention does (O(T·Dh));
with attention dropout the keep-masks are kept at any T (one byte a score, O(T·w)).

Backward per tile (P the probabilities, M the dropout keep-mask scaled by 1 / (1 − p), O the
output, dO its gradient): dV = (P∘M)ᵀ dO, dP = (dO Vᵀ)∘M, dS = P∘(dP − rowsum(dO∘O)), dQ = dS K,
dK = dSᵀ Q (FlashAttention-2, Dao 2023, Alg. 2). Dropout keep-masks are drawn in the forward from
the default generator (a seeded run repeats; a compiled model traces them, where a generator of
its own would break the graph) and kept for the backward as one byte a score, as autograd keeps
F.dropout's mask.

Shapes: BH batch × heads, T time, Dh head dim, N blocks of b queries, W band keys per block,
G global keys, h × n the (batch·head, block) extent of a tile.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

TILE_BYTES = 4 << 20  # float32 scores per tile: cache-sized, below glibc's mmap threshold
KEEP_BYTES = 512 << 20  # probabilities kept for the backward (T 16k × 8 heads × w 512: 335 MB)


def in_band(offset: Tensor, window: int, causal: bool) -> Tensor:
    """True where a key at distance ``offset = i − j`` lies in query i's window."""
    if causal:
        return (offset >= 0) & (offset < window)
    return offset.abs() <= window // 2


def with_global_positions(
    global_mask: Tensor | None, positions: tuple[int, ...], batch: int, length: int, device
) -> Tensor | None:
    """``global_mask`` (B, T) with ``positions`` (global in every row, all < T) set as well."""
    if not positions:
        return global_mask
    fixed = torch.zeros(batch, length, dtype=torch.bool, device=device)
    fixed[:, list(positions)] = True
    return fixed if global_mask is None else global_mask | fixed


@dataclass(frozen=True)
class BandLayout:
    """Block geometry and masks of one call (see the module docstring for the symbols)."""

    window: int
    causal: bool
    T: int
    b: int
    lb: int
    rb: int
    heads: int  # H: row r of the BH axis belongs to batch row r // H
    key_ok: Tensor  # (B, N, W) False at padding keys and outside 0..T−1
    col_ok: Tensor | None  # (B, N, b, G) global key columns a query sees (outside its band)
    dropout: float

    @classmethod
    def of(
        cls,
        T: int,
        *,
        window: int,
        causal: bool,
        block_size: int,
        keep: Tensor,
        heads: int,
        global_index: Tensor | None = None,
        global_valid: Tensor | None = None,
        dropout: float = 0.0,
    ) -> BandLayout:
        """The layout for keys kept where ``keep`` (B, T); globals at ``global_index`` (B, G)."""
        left = min(window - 1 if causal else window // 2, T - 1)  # farthest key behind a query
        right = 0 if causal else min(window // 2, T - 1)  # farthest key ahead of a query
        b = min(block_size, T)
        N, lb, rb = -(-T // b), -(-left // b), -(-right // b)
        W = (lb + 1 + rb) * b
        key_ok = F.pad(keep, (lb * b, rb * b + N * b - T), value=False).unfold(1, W, b)
        col_ok = None
        if global_index is not None:
            i = torch.arange(N * b, device=keep.device)[None, :, None]
            outside = ~in_band(i - global_index[:, None], window, causal)  # (B, N·b, G)
            col_ok = (global_valid[:, None] & outside).view(keep.shape[0], N, b, -1)
        return cls(window, causal, T, b, lb, rb, heads, key_ok, col_ok, dropout)

    @property
    def blocks(self) -> int:
        return self.key_ok.shape[1]

    @property
    def W(self) -> int:
        return (self.lb + 1 + self.rb) * self.b

    def windows(self, x: Tensor) -> Tensor:
        """(BH, T, Dh) → (BH, N, W, Dh) overlapping view of the zero-padded keys or values."""
        pad = (self.lb * self.b, self.rb * self.b + self.blocks * self.b - self.T)
        return F.pad(x, (0, 0, *pad)).unfold(1, self.W, self.b).transpose(-1, -2)

    def score_bytes(self, BH: int, G: int) -> int:
        """Bytes of all float32 scores of a call."""
        return BH * self.blocks * self.b * (self.W + G) * 4

    def tiles(self, BH: int, G: int) -> Iterator[tuple[slice, slice]]:
        """(BH slice, block slice) tiles of at most ``TILE_BYTES`` of float32 scores."""
        N, per_block = self.blocks, self.b * (self.W + G) * 4
        n = max(1, min(N, TILE_BYTES // per_block))
        h = max(1, min(BH, TILE_BYTES // (per_block * n))) if n == N else 1
        for h0 in range(0, BH, h):
            for n0 in range(0, N, n):
                yield slice(h0, min(h0 + h, BH)), slice(n0, min(n0 + n, N))

    def mask_(self, scores: Tensor, hs: slice, ns: slice) -> None:
        """Set the scores (h, n, b, W + G) of keys outside each query's key set to the lowest
        finite value (a row with nothing allowed stays finite: uniform, then zeroed by padding)."""
        dev, lowest = scores.device, torch.finfo(scores.dtype).min
        offset = torch.arange(self.b, device=dev)[:, None] + self.lb * self.b
        offset = offset - torch.arange(self.W, device=dev)  # i − j
        rows = torch.arange(hs.start, hs.stop, device=dev) // self.heads
        band = scores[..., : self.W]
        band.masked_fill_(~in_band(offset, self.window, self.causal), lowest)
        band.masked_fill_(~self.key_ok[rows, ns, None], lowest)
        if self.col_ok is not None:
            scores[..., self.W :].masked_fill_(~self.col_ok[rows, ns], lowest)

    def keep_mask(self, scores: Tensor) -> Tensor:
        """A fresh dropout keep-mask (bool) of a tile's scores."""
        return torch.rand(scores.shape, device=scores.device) >= self.dropout

    def dropped(self, p: Tensor, keep: Tensor) -> Tensor:
        """Probabilities (or their gradients) after dropout: kept ones scaled by 1 / (1 − p)."""
        return p * keep / (1 - self.dropout)


def _probs(layout: BandLayout, q: Tensor, k: Tensor, kg: Tensor | None, hs: slice,
           ns: slice) -> Tensor:  # fmt: skip
    """Softmax probabilities (h, n, b, W + G), float32 at least, of one tile."""
    scores = q @ k.transpose(-1, -2)
    if kg is not None:
        scores = torch.cat([scores, q @ kg[:, None].transpose(-1, -2)], dim=-1)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    layout.mask_(scores, hs, ns)
    return torch.ops.aten._softmax.out(scores, -1, False, out=scores)


class BandAttention(torch.autograd.Function):
    """(BH, T, Dh) q, k, v (+ (BH, G, Dh) global keys/values) → (BH, T, Dh); q is pre-scaled."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kg: Tensor | None, vg: Tensor | None,
                layout: BandLayout) -> Tensor:  # fmt: skip
        BH, T, Dh = q.shape
        N, b, W, G = layout.blocks, layout.b, layout.W, 0 if kg is None else kg.shape[1]
        qb = F.pad(q, (0, 0, 0, N * b - T)).view(BH, N, b, Dh)
        kw, vw = layout.windows(k), layout.windows(v)
        out = q.new_empty(BH, N, b, Dh)
        keep = any(ctx.needs_input_grad) and layout.score_bytes(BH, G) <= KEEP_BYTES
        kept = [] if keep else None  # probabilities for the backward, if not recomputed there
        masks = []  # dropout keep-masks, one a tile
        for hs, ns in layout.tiles(BH, G):
            p = _probs(layout, qb[hs, ns], kw[hs, ns], None if kg is None else kg[hs], hs, ns)
            if kept is not None:
                kept.append(p)
            if layout.dropout:
                masks.append(layout.keep_mask(p))
                p = layout.dropped(p, masks[-1])
            p = p.to(v.dtype)
            o = p[..., :W] @ vw[hs, ns]
            out[hs, ns] = o if not G else o + p[..., W:] @ vg[hs, None]
        dev = q.device.type
        ctx.autocast = dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev)
        ctx.layout, ctx.kept = layout, kept
        ctx.save_for_backward(qb, k, v, kg, vg, out, *masks)
        return out.view(BH, N * b, Dh)[:, :T]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        with torch.autocast(*ctx.autocast):  # recompute the probabilities as the forward did
            kept, ctx.kept = ctx.kept, None
            qb, k, v, kg, vg, out, *masks = ctx.saved_tensors
            return BandAttention._grads(ctx.layout, kept, masks, grad, qb, k, v, kg, vg, out)

    @staticmethod
    def _grads(layout: BandLayout, kept: list[Tensor] | None, masks: list[Tensor], grad: Tensor,
               qb: Tensor, k: Tensor, v: Tensor, kg: Tensor | None, vg: Tensor | None,
               out: Tensor) -> tuple[Tensor | None, ...]:  # fmt: skip
        BH, N, b, Dh = qb.shape
        T, W, G, S = layout.T, layout.W, 0 if kg is None else kg.shape[1], layout.lb + 1 + layout.rb
        go = F.pad(grad, (0, 0, 0, N * b - T)).view(BH, N, b, Dh)
        acc = torch.promote_types(out.dtype, torch.float32)
        delta = (go * out).sum(-1, keepdim=True).to(acc)  # rowsum(dO∘O) = rowsum(dP∘P)
        kw, vw = layout.windows(k), layout.windows(v)
        dq = torch.empty_like(qb)
        dk, dv = (qb.new_zeros(BH, N + S - 1, b, Dh) for _ in "kv")  # padded, block-shaped
        dkg, dvg = (None, None) if kg is None else (torch.zeros_like(kg), torch.zeros_like(vg))
        for tile, (hs, ns) in enumerate(layout.tiles(BH, G)):
            q_t, go_t, k_t = qb[hs, ns], go[hs, ns], kw[hs, ns].contiguous()
            kg_t = None if kg is None else kg[hs]
            p = _probs(layout, q_t, k_t, kg_t, hs, ns) if kept is None else kept[tile]
            dp = go_t @ vw[hs, ns].transpose(-1, -2)
            if G:
                dp = torch.cat([dp, go_t @ vg[hs, None].transpose(-1, -2)], dim=-1)
            dp, p_dropped = dp.to(acc), p
            if layout.dropout:
                p_dropped, dp = layout.dropped(p, masks[tile]), layout.dropped(dp, masks[tile])
            p_dropped = p_dropped.to(v.dtype)
            ds = dp.sub_(delta[hs, ns]).mul_(p).to(q_t.dtype)
            dq_t = ds[..., :W] @ k_t
            dk_w = ds[..., :W].transpose(-1, -2) @ q_t  # (h, n, W, Dh): overlapping windows
            dv_w = p_dropped[..., :W].transpose(-1, -2) @ go_t
            if G:
                dq_t = dq_t + ds[..., W:] @ kg[hs, None]
                dkg[hs] += (ds[..., W:].transpose(-1, -2) @ q_t).sum(1)
                dvg[hs] += (p_dropped[..., W:].transpose(-1, -2) @ go_t).sum(1)
            dq[hs, ns] = dq_t
            n0, n = ns.start, ns.stop - ns.start
            for j in range(S):  # window block j of query block n is key block n + j (padded)
                dk[hs, n0 + j : n0 + j + n] += dk_w[:, :, j * b : (j + 1) * b]
                dv[hs, n0 + j : n0 + j + n] += dv_w[:, :, j * b : (j + 1) * b]
        lo = layout.lb * b
        dk, dv = (d.view(BH, -1, Dh)[:, lo : lo + T] for d in (dk, dv))
        return dq.view(BH, N * b, Dh)[:, :T], dk, dv, dkg, dvg, None
