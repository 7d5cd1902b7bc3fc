"""Sliding-window + global attention through FlexAttention (the CUDA path).

`torch.nn.attention.flex_attention`, compiled, runs a fused flash-style kernel that skips every
128 × 128 tile its block mask marks empty, so time and memory are O(T·w) like the blocked path
of `sliding_window`, on tensor cores. The mask is the same key set as
`sliding_window_mask`: the band (`in_band`), ∪ global tokens as queries and as keys, − padding
keys; padded query rows are zeroed afterwards. The block mask of a plain band depends only on
(T, w, causal, device) and is built once and cached; with padding or global tokens it depends
on the batch and is built per call (compiled, without a T × T tensor).

No dropout: the caller falls back to the blocked path when attention dropout is on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from advarch.models.blocks.band_attention import in_band


def window_mask_mod(
    window: int, causal: bool, keep: Tensor | None = None, glob: Tensor | None = None
) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention mask_mod: True where query ``q`` of row ``b`` may attend key ``kv``.

    ``keep`` (B, T) is False at padding; ``glob`` (B, T) True at (non-padding) global tokens.
    """

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        allowed = in_band(q - kv, window, causal)
        if glob is not None:
            allowed = allowed | glob[b, q] | glob[b, kv]
        return allowed if keep is None else allowed & keep[b, kv]

    return mask_mod


@functools.lru_cache(maxsize=32)
def band_block_mask(length: int, window: int, causal: bool, device: torch.device) -> BlockMask:
    """The block mask of a plain band, built once per (T, w, causal, device)."""
    return _block_mask(window_mask_mod(window, causal), None, length, device)


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
    compiled: bool = True,
) -> Tensor:
    """`sliding_window_attention` semantics through FlexAttention; q, k, v (B, H, T, Dh).

    ``compiled=False`` runs FlexAttention eagerly (CPU, forward only: what tests can check
    without a GPU).
    """
    B, _, T, _ = q.shape
    if pad_mask is None and global_mask is None:
        block_mask = band_block_mask(T, window, causal, q.device)
    else:
        keep = None if pad_mask is None else ~pad_mask
        glob = None if global_mask is None else global_mask if keep is None else global_mask & keep
        block_mask = _block_mask(window_mask_mod(window, causal, keep, glob), B, T, q.device)
    attend = _compiled(flex_attention) if compiled else flex_attention
    out = attend(q, k, v, block_mask=block_mask)
    return out if pad_mask is None else out.masked_fill(pad_mask[:, None, :, None], 0.0)
