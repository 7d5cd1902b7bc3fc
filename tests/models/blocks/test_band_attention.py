"""The tiled band kernel: tile boundaries, recomputed backward and dropout masks."""

from __future__ import annotations

import pytest
import torch

from advarch.models.blocks import band_attention
from advarch.models.blocks.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_reference,
)
from tests.models.blocks.test_sliding_window import assert_matches_reference, masks, qkv

F64 = torch.float64


@pytest.mark.parametrize("tile_bytes", [1, 3000, 40_000])  # 1 block a tile; tiles across rows
@pytest.mark.parametrize("keep_bytes", [0, 10**9])  # backward recomputes / keeps probabilities
@pytest.mark.parametrize("causal,glob", [(True, False), (False, True)])
def test_every_tiling_matches_the_reference(monkeypatch, tile_bytes, keep_bytes, causal, glob):
    monkeypatch.setattr(band_attention, "TILE_BYTES", tile_bytes)
    monkeypatch.setattr(band_attention, "KEEP_BYTES", keep_bytes)
    q, k, v = qkv(3, 3, 37, 4, seed=tile_bytes)
    pad_mask, global_mask = masks(3, 37, pad=True, glob=glob, seed=1)
    kw = dict(window=9, causal=causal, pad_mask=pad_mask, global_mask=global_mask)
    assert_matches_reference(q, k, v, block_size=4, **kw)


BLOCK_BYTES = 8 * 24 * 4  # block 8 × window keys 24 (causal w 16: 2 blocks back) × float32


@pytest.mark.parametrize("blocks_per_tile", [0, 5, 13 * 4, 10**6])
def test_tiles_cover_every_block_once(monkeypatch, blocks_per_tile):
    monkeypatch.setattr(band_attention, "TILE_BYTES", blocks_per_tile * BLOCK_BYTES)
    keep = torch.ones(2, 100, dtype=torch.bool)
    layout = band_attention.BandLayout.of(100, window=16, causal=True, block_size=8, keep=keep,
                                          heads=3)  # fmt: skip
    seen = torch.zeros(6, layout.blocks, dtype=torch.int64)
    for hs, ns in layout.tiles(6, 0):
        assert (hs.stop - hs.start) * (ns.stop - ns.start) <= max(blocks_per_tile, 1)
        seen[hs, ns] += 1
    assert seen.eq(1).all()


@pytest.mark.parametrize("keep_bytes", [0, 10**9])
@pytest.mark.parametrize("causal,glob", [(True, False), (False, True)])
def test_dropout_backward_uses_the_forward_masks(monkeypatch, keep_bytes, causal, glob):
    """Finite differences of the dropout forward (same seed each call) equal the hand-written
    backward: the backward tiles use exactly the forward's keep-masks."""
    monkeypatch.setattr(band_attention, "TILE_BYTES", 2000)  # several tiles, several masks
    monkeypatch.setattr(band_attention, "KEEP_BYTES", keep_bytes)
    q, k, v = qkv(2, 2, 11, 4)
    pad_mask, global_mask = masks(2, 11, pad=True, glob=glob)
    kw = dict(window=4, causal=causal, pad_mask=pad_mask, global_mask=global_mask)

    def attend(q, k, v):
        torch.manual_seed(0)
        return sliding_window_attention(q, k, v, block_size=2, dropout=0.4, **kw)

    assert not torch.equal(attend(q, k, v), sliding_window_attention_reference(q, k, v, **kw))
    assert torch.autograd.gradcheck(attend, (q, k, v))


def test_dropout_keeps_the_expectation():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 64, 8, dtype=F64) for _ in range(3))
    kw = dict(window=16, causal=False)
    mean = torch.stack([sliding_window_attention(q, k, v, dropout=0.5, **kw) for _ in range(400)])
    ref = sliding_window_attention_reference(q, k, v, **kw)
    assert (mean.mean(0) - ref).abs().mean() < 0.1 * ref.abs().mean()
