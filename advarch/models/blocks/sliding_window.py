"""Sliding-window attention with global tokens (Longformer, Beltagy et al. 2020, §3.1).

Longformer keeps scaled dot-product attention softmax(QKᵀ/√Dh)V (Vaswani et al. 2017, eq. 1)
but lets query i see only the keys j of a sparse pattern: a band around the diagonal, plus
"global" tokens that see and are seen by every token.

Window definition (w = ``window``; counts are for rows away from the sequence ends):

* causal:        i − w < j ≤ i     → w keys, the query itself included (min(w, i + 1) keys);
* bidirectional: |i − j| ≤ w // 2  → 2·(w // 2) + 1 keys (w + 1 for even w, as Longformer's
  ``attention_window``; w for odd w; ``window=1`` sees only itself).

Global tokens are bidirectional only (``global_mask`` with ``causal=True`` raises ValueError):
a global query attends to every non-padding key, and every query attends to every global key;
a key inside the band that is also global is counted once. Padding keys are never attended;
padded query rows (and tokens flagged both padding and global) return zeros. The module's
``global_tokens`` fixes positions that are global in every sequence (Longformer's [CLS] of a
classifier, §3.1), added to the ``global_mask`` a caller passes.

On CUDA `sliding_window_attention` runs compiled FlexAttention with a block mask of the same
key set (`flex_window`); elsewhere, and with attention dropout, the blocked path below.
Computation is blocked so time and memory are O(T·w), never a T×T tensor: T is padded to N
blocks of b queries; each query block scores against its own key block and ⌈reach / b⌉
neighbour blocks per side plus the G global keys, a few blocks at a time (probabilities kept
for the backward pass, or recomputed there at long T: `band_attention`); global query rows are
dense, O(G·T).

Incremental decoding (causal only): ``step`` keeps a rolling cache of the last w rotated keys and
values (slot p % w holds position p), so memory and time per token are O(w) for any length;
``prefill`` runs a prompt through the blocked attention and fills that cache in one pass.
Rotary positions are absolute, 0..T−1, padding included.

Shapes: B batch, T time, D model dim, H heads, Dh head dim, b block size, N blocks,
W band keys per query block, G global tokens (max over the batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advarch.models.blocks.band_attention import (
    BandAttention,
    BandLayout,
    in_band,
    with_global_positions,
)
from advarch.models.blocks.config import BlockConfig, Checks, ModelShape, heads_check
from advarch.models.blocks.rotary import Rotary

CAUSAL_GLOBAL_TOKENS = (
    "model.swa.global_tokens={} needs bidirectional attention: global tokens attend to the "
    "future (use them with a classifier, a regressor or a seq2seq encoder)"
)


def _check(window: int, causal: bool, has_globals: bool, prefix: str = "") -> None:
    if window < 1:
        raise ValueError(f"{prefix}window={window} must be >= 1")
    if causal and has_globals:
        raise ValueError(
            f"global tokens need bidirectional attention ({prefix}causal=false): they attend to "
            "the future"
        )


def _softmax(scores: Tensor, allowed: Tensor, dropout: float) -> Tensor:
    """Masked softmax in float32 at least (float64 stays float64).

    The mask is an additive bias of the most negative finite value, so a row with nothing
    allowed stays finite (uniform) instead of NaN. ``scores`` is consumed: the bias is added in
    place without autograd (one score-sized buffer less), out of place with it, because in-place
    ops on matmul outputs (views) send autograd through a slow as_strided path.
    """
    dtype = torch.promote_types(scores.dtype, torch.float32)
    bias = torch.zeros((), dtype=dtype, device=scores.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
    scores = scores.to(dtype)
    scores = scores + bias if scores.requires_grad else scores.add_(bias)
    probs = scores.softmax(dim=-1)
    return F.dropout(probs, p=dropout, training=dropout > 0)


def _gather_time(x: Tensor, index: Tensor) -> Tensor:
    """x (B, H, T, Dh), index (B, G) → (B, H, G, Dh)."""
    B, H, _, Dh = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, -1, Dh))


@dataclass
class _Globals:
    """The G global tokens of each row, padded to the batch maximum."""

    index: Tensor  # (B, G) positions, real ones first
    valid: Tensor  # (B, G) False at padding slots
    slot: Tensor  # (B, T) rank of each global token among its row's globals

    @classmethod
    def of(cls, gm: Tensor) -> _Globals | None:
        count = gm.sum(1, keepdim=True)  # (B, 1)
        G = int(count.max())
        if G == 0:
            return None
        index = torch.argsort((~gm).to(torch.uint8), dim=1, stable=True)[:, :G]
        valid = torch.arange(G, device=gm.device) < count
        return cls(index, valid, (gm.cumsum(1) - 1).clamp(min=0))


def _global_rows(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, g: _Globals, p: float) -> Tensor:
    """Dense attention of the global queries over every kept key, O(G·T) → (B, H, T, Dh), the
    row of each global token at its position (other positions are filler for a ``where``)."""
    probs = _softmax(_gather_time(q, g.index) @ k.transpose(-1, -2), keep[:, None, None], p)
    return _gather_time(probs.to(v.dtype) @ v, g.slot)


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool,
    pad_mask: Tensor | None = None,
    global_mask: Tensor | None = None,
    global_positions: Sequence[int] = (),
    block_size: int | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Sliding-window + global attention: FlexAttention on CUDA, the blocked path elsewhere.

    ``global_positions`` are global in every row (those ≥ T left out), as if set in
    ``global_mask``; given apart, a CUDA call without masks reuses one block mask per shape.
    CUDA calls without attention dropout and with a power-of-two head dim ≥ 16 go to
    `flex_window.flex_window_attention` (compiled FlexAttention, a cached block mask); the rest,
    CPU included, to `sliding_window_attention_blocked`. Same arguments and result as the latter.
    """
    B, _, T, _ = q.shape
    positions = tuple(sorted({p for p in global_positions if p < T}))
    _check(window, causal, global_mask is not None or bool(positions))
    if q.device.type == "cuda":
        from advarch.models.blocks import flex_window  # imports FlexAttention where it is used

        if flex_window.flex_supported(q, dropout):
            return flex_window.flex_window_attention(
                q, k, v, window=window, causal=causal, pad_mask=pad_mask, global_mask=global_mask,
                global_positions=positions,
            )  # fmt: skip
    global_mask = with_global_positions(global_mask, positions, B, T, q.device)
    return sliding_window_attention_blocked(
        q, k, v, window=window, causal=causal, pad_mask=pad_mask, global_mask=global_mask,
        block_size=block_size, dropout=dropout,
    )  # fmt: skip


def sliding_window_attention_blocked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool,
    pad_mask: Tensor | None = None,
    global_mask: Tensor | None = None,
    block_size: int | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Blocked sliding-window + global attention, O(T·w) time and memory.

    1. pad T to N blocks of b; view keys/values as overlapping windows of W = (lb + 1 + rb)·b;
    2. `BandAttention`: score each query block against its window (+ G global key columns),
       mask, softmax, multiply by the values, a tile of blocks at a time;
    3. overwrite global query rows with dense rows; zero padded rows.

    Args:
        q, k, v: (B, H, T, Dh) queries, keys, values (rotary already applied).
        window: w of the module docstring.
        causal: band behind the query (True) or centred on it (False).
        pad_mask: (B, T) bool, True at padding.
        global_mask: (B, T) bool, True at global tokens (bidirectional only).
        block_size: queries per block (speed only); default max(64, w // 4), capped at T.
        dropout: dropout probability on the attention probabilities.

    Returns:
        (B, H, T, Dh) attention output; zeros at padded query rows.
    """
    _check(window, causal, global_mask is not None)
    B, H, T, Dh = q.shape
    keep = torch.ones(B, T, dtype=torch.bool, device=q.device) if pad_mask is None else ~pad_mask
    g = None if global_mask is None else _Globals.of(global_mask & keep)
    layout = BandLayout.of(
        T, window=window, causal=causal, block_size=block_size or max(64, window // 4),
        keep=keep, heads=H, global_index=None if g is None else g.index,
        global_valid=None if g is None else g.valid, dropout=dropout,
    )  # fmt: skip
    q = q * Dh**-0.5
    kg = vg = None
    if g is not None:  # global key columns, gathered once: (B·H, G, Dh)
        kg, vg = (_gather_time(x, g.index).flatten(0, 1) for x in (k, v))
    out = BandAttention.apply(*(x.flatten(0, 1) for x in (q, k, v)), kg, vg, layout)
    out = out.view(B, H, T, Dh)
    if g is not None:
        rows = _global_rows(q, k, v, keep, g, dropout)
        out = torch.where(global_mask[:, None, :, None], rows, out)  # padded rows zeroed next
    return out if pad_mask is None else out.masked_fill(pad_mask[:, None, :, None], 0.0)


def sliding_window_mask(
    T: int,
    *,
    window: int,
    causal: bool,
    pad_mask: Tensor | None = None,
    global_mask: Tensor | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """Dense (B or 1, T, T) bool mask, True where query i may attend key j (band ∪ global − pad)."""
    i = torch.arange(T, device=device)
    allowed = in_band(i[:, None] - i[None, :], window, causal)[None]  # (1, T, T)
    if global_mask is not None:
        gm = global_mask if pad_mask is None else global_mask & ~pad_mask
        allowed = allowed | gm[:, :, None] | gm[:, None, :]
    if pad_mask is not None:
        allowed = allowed & ~pad_mask[:, None, :]
    return allowed


def sliding_window_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool,
    pad_mask: Tensor | None = None,
    global_mask: Tensor | None = None,
) -> Tensor:
    """Dense O(T²) SDPA with the equivalent full mask; the ground truth for tests and benchmarks."""
    _check(window, causal, global_mask is not None)
    T = q.shape[2]
    allowed = sliding_window_mask(
        T, window=window, causal=causal, pad_mask=pad_mask, global_mask=global_mask, device=q.device
    )
    if pad_mask is not None:  # padded rows see themselves so SDPA stays finite; zeroed below
        allowed = allowed | (pad_mask[:, :, None] & torch.eye(T, dtype=torch.bool, device=q.device))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
    return out if pad_mask is None else out.masked_fill(pad_mask[:, None, :, None], 0.0)


@dataclass
class SlidingWindowState:
    """Rolling KV cache: slot ``p % window`` holds the rotated key/value of position p."""

    k: Tensor  # (B, H, w, Dh)
    v: Tensor  # (B, H, w, Dh)
    pos: int  # position of the next token


class SlidingWindowAttention(nn.Module):
    """Multi-head sliding-window attention: qkv projection, rotary, band attention, out projection.

    Args:
        dim: model width D.
        num_heads: H; D must be divisible by H (and D / H even when ``rotary``).
        window: w, see the module docstring for the exact key set.
        causal: causal band (decoders, supports ``step``) or centred band with global tokens.
        global_tokens: positions global in every sequence (bidirectional only; those beyond
            a sequence's length are left out, padding ones are never attended).
        rotary: apply RoPE to queries and keys at their absolute positions.
        dropout: dropout on attention probabilities (training only).
        block_size: queries per block of the blocked kernel (speed knob, not semantics).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: int = 256,
        causal: bool = True,
        rotary: bool = True,
        dropout: float = 0.0,
        block_size: int | None = None,
        global_tokens: Sequence[int] = (),
    ) -> None:
        super().__init__()
        config = SlidingWindowConfig(
            window=window, num_heads=num_heads, rotary=rotary, block_size=block_size,
            global_tokens=tuple(global_tokens),
        )  # fmt: skip
        config.validate(ModelShape(dim=dim, dropout=dropout))
        if causal and global_tokens:
            raise ValueError(CAUSAL_GLOBAL_TOKENS.format(list(global_tokens)))
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window, self.causal, self.dropout = window, causal, dropout
        self.block_size, self.global_tokens = block_size, sorted(global_tokens)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rotary = Rotary(self.head_dim) if rotary else None

    def _qkv(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, D) → q, k, v (B, H, T, Dh), rotary applied at ``positions`` (T,)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        return q, k, v

    def _merge(self, y: Tensor) -> Tensor:
        """(B, H, T, Dh) → output projection (B, T, D)."""
        B, _, T, _ = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, self.dim))

    def forward(
        self, x: Tensor, *, pad_mask: Tensor | None = None, global_mask: Tensor | None = None
    ) -> Tensor:
        """x (B, T, D); pad_mask / global_mask (B, T) bool → (B, T, D), zeros at padding."""
        _check(self.window, self.causal, global_mask is not None, prefix="model.swa.")
        q, k, v = self._qkv(x, torch.arange(x.shape[1], device=x.device))
        return self._attend(q, k, v, pad_mask, global_mask)

    def _attend(
        self, q: Tensor, k: Tensor, v: Tensor, pad_mask: Tensor | None, global_mask: Tensor | None
    ) -> Tensor:
        """Band attention of q, k, v (B, H, T, Dh) → output projection (B, T, D)."""
        y = sliding_window_attention(
            q,
            k,
            v,
            window=self.window,
            causal=self.causal,
            pad_mask=pad_mask,
            global_mask=global_mask,
            global_positions=self.global_tokens,
            block_size=self.block_size,
            dropout=self.dropout if self.training else 0.0,
        )
        return self._merge(y)

    def init_state(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> SlidingWindowState:
        """Empty rolling cache of ``window`` slots, O(w) memory whatever the sequence length."""
        if not self.causal:
            raise ValueError("step needs model.swa.causal=true")
        shape = (batch_size, self.num_heads, self.window, self.head_dim)
        empty = torch.zeros(shape, device=device, dtype=dtype)
        return SlidingWindowState(k=empty, v=empty.clone(), pos=0)

    def step(self, x: Tensor, state: SlidingWindowState) -> tuple[Tensor, SlidingWindowState]:
        """One token x (B, 1, D) → (B, 1, D) and the cache with its key/value written in."""
        q, k, v = self._qkv(x, torch.tensor([state.pos], device=x.device))  # (B, H, 1, Dh)
        slots = torch.arange(self.window, device=x.device)
        write = (slots == state.pos % self.window)[:, None]  # (w, 1)
        k_cache, v_cache = torch.where(write, k, state.k), torch.where(write, v, state.v)
        scores = (q * self.head_dim**-0.5) @ k_cache.transpose(-1, -2)  # (B, H, 1, w)
        p = self.dropout if self.training else 0.0
        probs = _softmax(scores, slots <= state.pos, p).to(v.dtype)  # filled slots only
        return self._merge(probs @ v_cache), SlidingWindowState(k_cache, v_cache, state.pos + 1)

    def prefill(self, x: Tensor) -> tuple[Tensor, SlidingWindowState]:
        """A prompt x (B, T, D) through the blocked band attention, O(T·w) → (B, T, D) and the
        rolling cache after it: the last min(T, w) rotated keys and values, position p in slot
        p % w, as T calls of `step` would have left it (the other slots stay empty)."""
        B, T, _ = x.shape
        q, k, v = self._qkv(x, torch.arange(T, device=x.device))
        state = self.init_state(B, x.device, k.dtype)
        last = torch.arange(max(0, T - self.window), T, device=x.device)
        slots = last % self.window
        state.k[:, :, slots], state.v[:, :, slots] = k[:, :, last], v[:, :, last]
        state.pos = T
        return self._attend(q, k, v, None, None), state


@dataclass(frozen=True)
class SlidingWindowConfig(BlockConfig):
    """`model.swa`: sliding-window attention options (see `SlidingWindowAttention`).

    `num_heads` None takes `model.num_heads`; causality and dropout come from the model.
    `global_tokens` are positions global in every sequence of a bidirectional stack (a
    classifier's or regressor's encoder, a seq2seq encoder; a seq2seq decoder, causal, has
    none; a language model refuses them).
    """

    name: ClassVar[str] = "swa"

    window: int = 256
    num_heads: int | None = None
    rotary: bool = True
    block_size: int | None = None
    global_tokens: Sequence[int] = ()

    def heads(self, shape: ModelShape) -> int:
        return shape.num_heads if self.num_heads is None else self.num_heads

    def checks(self, shape: ModelShape) -> Checks:
        yield self.window >= 1, f"{self.key('window')}={self.window} must be >= 1"
        heads, dim = self.heads(shape), shape.dim
        heads_key = "model.num_heads" if self.num_heads is None else self.key("num_heads")
        yield heads_check(dim, heads, heads_key)
        yield (
            not self.rotary or (dim // heads) % 2 == 0,
            f"model.dim / {heads_key} = {dim // heads} must be even for {self.key('rotary')}=true",
        )
        yield (
            self.block_size is None or self.block_size >= 1,
            f"{self.key('block_size')}={self.block_size} must be >= 1 or null",
        )
        positions = list(self.global_tokens)
        yield (
            all(p >= 0 for p in positions) and len(set(positions)) == len(positions),
            f"{self.key('global_tokens')}={positions} must be distinct positions >= 0",
        )

    def build(self, shape: ModelShape, causal: bool = True) -> SlidingWindowAttention:
        """The attention mixer of a layer of `shape`."""
        return SlidingWindowAttention(
            shape.dim,
            self.heads(shape),
            window=self.window,
            causal=causal,
            rotary=self.rotary,
            dropout=shape.dropout,
            block_size=self.block_size,
            global_tokens=() if causal else self.global_tokens,
        )
