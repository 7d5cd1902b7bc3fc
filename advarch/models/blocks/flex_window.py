"""Sliding-window + global attention through FlexAttention (the CUDA path).

`torch.nn.attention.flex_attention`, compiled, runs a fused flash-style kernel that skips every
128 × 128 tile its block mask marks empty, so time and memory are O(T·w) like the blocked path
of `sliding_window`, on tensor cores. The mask is the same key set as
`sliding_window_mask`: the band (`in_band`), ∪ global tokens as queries and as keys, − padding
keys; padded query rows are zeroed afterwards. The block mask of a band with global positions
fixed for every row (a model's ``global_tokens``) depends only on (T, w, causal, positions,
device) and is built once and cached. With padding or a per-row ``global_mask`` it depends on
the batch: it is built (compiled, without a T × T tensor) when those mask tensors change, so a
training forward whose layers pass the same masks builds it once, not once per layer (in
inference mode, and inside a compiled graph, each layer builds its own).

No dropout: the caller falls back to the blocked path when attention dropout is on.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from advarch.models.blocks.band_attention import in_band, with_global_positions


def window_mask_mod(
    window: int, causal: bool, keep: Tensor | None = None, glob: Tensor | None = None
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention mask_mod: True where query ``q`` of row ``b`` may attend key ``kv``.

    ``keep`` (B, T) is False at padding; ``glob`` True at (non-padding) global tokens, (B, T)
    or (T,) where they are the same in every row.
    """

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        allowed = in_band(q - kv, window, causal)
        if glob is not None:
            row = glob if glob.dim() == 1 else glob[b]
            allowed = allowed | row[q] | row[kv]
        return allowed if keep is None else allowed & keep[b, kv]

    return mask_mod


@functools.lru_cache(maxsize=32)
def band_block_mask(
    length: int, window: int, causal: bool, device: torch.device, positions: tuple[int, ...] = ()
) -> BlockMask:
    """The block mask of a band ∪ global ``positions`` (all < T), built once per argument set,
    of normal tensors even when first asked for in inference mode (validation's sanity check
    before training): FlexAttention saves them for the backward of every later training step,
    which inference tensors refuse."""
    with contextlib.nullcontext() if torch.compiler.is_compiling() else torch.inference_mode(False):
        glob = with_global_positions(None, positions, 1, length, device)
        glob = None if glob is None else glob[0]
        return _block_mask(window_mask_mod(window, causal, glob=glob), None, length, device)


@dataclass
class _BatchBlockMask:
    """A per-batch block mask and what it was built from: the mask tensors themselves (held, so
    their ids stay theirs) and their version counters (an in-place change invalidates it)."""

    masks: tuple[Tensor | None, Tensor | None]
    versions: tuple[int, ...]
    shape: tuple
    block_mask: BlockMask

    def serves(self, masks: tuple[Tensor | None, Tensor | None], shape: tuple) -> bool:
        return (
            shape == self.shape
            and all(a is b for a, b in zip(masks, self.masks, strict=True))
            and _versions(masks) == self.versions
        )


def _memoizable(masks: tuple[Tensor | None, ...]) -> bool:
    """Whether a per-batch block mask of ``masks`` may be kept for the next call: not while
    compiling (Dynamo traces none of this: the graph builds it), nor in inference mode (its
    tensors could not be saved for a later training step's backward), nor for inference
    tensors (they keep no version counter)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return False
    return not any(m is not None and m.is_inference() for m in masks)


def _versions(masks: tuple[Tensor | None, ...]) -> tuple[int, ...]:
    return tuple(-1 if m is None else m._version for m in masks)


_last_batch_mask: list[_BatchBlockMask] = []  # at most one: the last forward's


def batch_block_mask(
    window: int,
    causal: bool,
    pad_mask: Tensor | None,
    global_mask: Tensor | None,
    positions: tuple[int, ...],
    length: int,
    device: torch.device,
) -> BlockMask:
    """The block mask of a band ∪ global tokens − padding keys for this batch's masks, reused
    while the next call passes the same (unchanged) mask tensors: every layer of a forward."""
    masks = (pad_mask, global_mask)
    shape = (window, causal, positions, length, device)
    memo = _memoizable(masks)
    last = _last_batch_mask[0] if memo and _last_batch_mask else None  # (read once: threads)
    if last is not None and last.serves(masks, shape):
        return last.block_mask
    batch = next(m.shape[0] for m in masks if m is not None)
    keep = None if pad_mask is None else ~pad_mask
    glob = with_global_positions(global_mask, positions, batch, length, device)
    glob = glob if keep is None or glob is None else glob & keep
    block_mask = _block_mask(window_mask_mod(window, causal, keep, glob), batch, length, device)
    if memo:
        _last_batch_mask[:] = [_BatchBlockMask(masks, _versions(masks), shape, block_mask)]
    return block_mask


def _block_mask(mask_mod: Callable, batch: int | None, length: int, device) -> BlockMask:
    """The block mask of `mask_mod`; on CUDA through a compiled builder (no dense T × T mask
    on the way), itself traced where the model is compiled (one graph, no break per layer)."""
    build = create_block_mask
    if torch.device(device).type == "cuda" and not torch.compiler.is_compiling():
        build = _compiled(create_block_mask)
    return build(mask_mod, batch, None, length, length, device=device)


@functools.cache
def _compiled(function: Callable) -> Callable:
    """`function` compiled, for a fixed T as specialised as before; a second T (prompts'
    prefills) compiles its shapes as symbols, rather than recompiling until Dynamo's limit, past
    which FlexAttention runs unfused, O(T²) (`dynamic=None`: Dynamo's automatic dynamic)."""
    return torch.compile(function, dynamic=None)


def flex_supported(q: Tensor, dropout: float) -> bool:
    """Whether the compiled FlexAttention kernel covers this call (else use the blocked path)."""
    head_dim = q.shape[-1]
    return (
        q.device.type == "cuda"
        and dropout == 0.0
        and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and head_dim >= 16
        and head_dim & (head_dim - 1) == 0
    )


def flex_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    causal: bool,
    pad_mask: Tensor | None = None,
    global_mask: Tensor | None = None,
    global_positions: tuple[int, ...] = (),
    compiled: bool = True,
) -> Tensor:
    """`sliding_window_attention` semantics through FlexAttention; q, k, v (B, H, T, Dh);
    ``global_positions`` sorted, distinct and < T.

    ``compiled=False`` runs FlexAttention eagerly (CPU, forward only: what tests can check
    without a GPU).
    """
    T = q.shape[2]
    if pad_mask is None and global_mask is None:
        block_mask = band_block_mask(T, window, causal, q.device, global_positions)
    else:
        block_mask = batch_block_mask(
            window, causal, pad_mask, global_mask, global_positions, T, q.device
        )
    attend = _compiled(flex_attention) if compiled else flex_attention
    out = attend(q, k, v, block_mask=block_mask)
    return out if pad_mask is None else out.masked_fill(pad_mask[:, None, :, None], 0.0)
