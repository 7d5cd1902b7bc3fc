"""FlexAttention sliding window (the CUDA path) against the dense reference.

On CPU FlexAttention runs eagerly and forward only, which checks the mask_mod and block mask
(band ∪ global − padding, zeroed padded rows); with CUDA the compiled kernel is checked in
outputs and gradients against the float64 CPU reference.
"""

from __future__ import annotations

import pytest
import torch

from advarch.models.blocks import flex_window
from advarch.models.blocks.flex_window import band_block_mask, flex_window_attention
from advarch.models.blocks.sliding_window import (
    SlidingWindowAttention,
    sliding_window_attention,
    sliding_window_attention_reference,
)

CUDA = torch.cuda.is_available()


def _qkv(T: int, seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, T, 16, generator=g, dtype=dtype) for _ in range(3)]


def _masks(T: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pad = torch.zeros(2, T, dtype=torch.bool)
    pad[0, T - 5 :] = True  # right padding in row 0
    glob = torch.rand(2, T, generator=g) < 0.05
    glob[1, 0] = glob[0, T - 1] = True  # a global token that is also padding
    return {"pad_mask": pad, "global_mask": glob}


CASES = [
    (dict(window=7, causal=True), False),
    (dict(window=1, causal=True), False),
    (dict(window=10, causal=False), False),
    (dict(window=9, causal=False), True),
]


@pytest.mark.parametrize(("kw", "masked"), CASES)
def test_eager_flex_matches_reference_on_cpu(kw, masked):
    T = 150  # more than one 128-token block, not a multiple of it
    q, k, v = _qkv(T, seed=1)
    masks = _masks(T, seed=2) if masked else {}
    with torch.no_grad():
        out = flex_window_attention(q, k, v, compiled=False, **kw, **masks)
    torch.testing.assert_close(out, sliding_window_attention_reference(q, k, v, **kw, **masks))


def _with_positions(masks: dict, positions: tuple[int, ...], T: int) -> dict:
    """``masks`` with ``positions`` global in every row, as the reference takes them."""
    glob = masks.get("global_mask", torch.zeros(2, T, dtype=torch.bool)).clone()
    glob[:, list(positions)] = True
    return {**masks, "global_mask": glob}


@pytest.mark.parametrize("masked", [False, True])
def test_eager_flex_with_fixed_global_positions_matches_reference_on_cpu(masked):
    T, kw, positions = 150, dict(window=9, causal=False), (0, 77, 149)
    q, k, v = _qkv(T, seed=6)
    masks = _masks(T, seed=7) if masked else {}
    with torch.no_grad():
        out = flex_window_attention(
            q, k, v, compiled=False, global_positions=positions, **kw, **masks
        )
    ref = sliding_window_attention_reference(q, k, v, **kw, **_with_positions(masks, positions, T))
    torch.testing.assert_close(out, ref)


def test_a_forwards_layers_build_one_block_mask(monkeypatch):
    """Every layer of a forward passes the same mask tensors: one block mask for all of them,
    a new one for the next batch's masks or after an in-place change; fixed global positions
    without masks are a per-shape mask, cached like the plain band."""
    built = []
    real = flex_window._block_mask
    monkeypatch.setattr(flex_window, "_block_mask", lambda *a: built.append(a) or real(*a))
    T, kw = 150, dict(window=9, causal=False)
    q, k, v = _qkv(T, seed=8)
    masks = _masks(T, seed=9)
    with torch.no_grad():
        for _ in range(3):  # three layers
            flex_window_attention(q, k, v, compiled=False, global_positions=(0,), **kw, **masks)
        assert len(built) == 1
        masks["pad_mask"][1, -1] = True  # the caller changed its mask in place
        out = flex_window_attention(q, k, v, compiled=False, global_positions=(0,), **kw, **masks)
        assert len(built) == 2
        ref = sliding_window_attention_reference(q, k, v, **kw, **_with_positions(masks, (0,), T))
        torch.testing.assert_close(out, ref)
        flex_window_attention(q, k, v, compiled=False, **kw, **_masks(T, seed=9))  # next batch
        assert len(built) == 3
        band_block_mask.cache_clear()
        for _ in range(2):
            flex_window_attention(q, k, v, compiled=False, global_positions=(0,), **kw)
        assert len(built) == 4


def test_batch_block_masks_trace_without_graph_breaks():
    """Under `model.compile=true` the layers build their batch's block mask in the graph: the
    memo's checks must not break it (`Tensor.is_inference()` does, in every layer)."""
    pad = torch.zeros(2, 150, dtype=torch.bool)

    def layers(pad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        for _ in range(2):
            mask = flex_window.batch_block_mask(9, False, pad, None, (0,), 150, x.device)
            x = x + mask.kv_num_blocks.sum()
        return x

    torch._dynamo.reset()
    assert torch._dynamo.explain(layers)(pad, torch.ones(2)).graph_break_count == 0


def test_no_block_mask_kept_from_inference_mode_holds_inference_tensors():
    """A mask first built in inference mode (validation's sanity check before training) and
    kept for later calls must be of normal tensors: FlexAttention saves them for a training
    step's backward, which inference tensors refuse."""
    band_block_mask.cache_clear()
    pad = torch.zeros(2, 150, dtype=torch.bool)
    with torch.inference_mode():
        kept = band_block_mask(150, 9, False, torch.device("cpu"), (0,))
        flex_window.batch_block_mask(9, False, pad, None, (), 150, torch.device("cpu"))
    assert not kept.kv_num_blocks.is_inference() and not kept.kv_indices.is_inference()
    trained = flex_window.batch_block_mask(9, False, pad, None, (), 150, torch.device("cpu"))
    assert not trained.kv_num_blocks.is_inference()
    band_block_mask.cache_clear()


def test_band_block_mask_is_built_once_per_shape():
    band_block_mask.cache_clear()
    for _ in range(2):
        band_block_mask(256, 64, True, torch.device("cpu"))
    band_block_mask(256, 64, False, torch.device("cpu"))
    assert band_block_mask.cache_info().misses == 2


def test_cpu_keeps_the_blocked_path(monkeypatch):
    monkeypatch.setattr(flex_window, "flex_window_attention", None)  # would raise if called
    q, k, v = _qkv(40, seed=3)
    out = sliding_window_attention(q, k, v, window=8, causal=True)
    ref = sliding_window_attention_reference(q, k, v, window=8, causal=True)
    torch.testing.assert_close(out, ref)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_flex_supported_only_without_dropout_and_on_power_of_two_heads():
    assert flex_window.flex_supported(torch.empty(1, 1, 4, 64, device="cuda"), 0.0)
    assert not flex_window.flex_supported(torch.empty(1, 1, 4, 64, device="cuda"), 0.1)
    assert not flex_window.flex_supported(torch.empty(1, 1, 4, 48, device="cuda"), 0.0)
    assert not flex_window.flex_supported(torch.empty(1, 1, 4, 64), 0.0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("kw", "masked"), CASES)
def test_compiled_flex_on_cuda_matches_reference_with_gradients(kw, masked):
    T = 300
    qkv = [t.double().requires_grad_() for t in _qkv(T, seed=4)]
    masks = _masks(T, seed=5) if masked else {}
    ref = sliding_window_attention_reference(*qkv, **kw, **masks)
    dy = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, qkv, dy)
    cuda_qkv = [t.detach().float().cuda().requires_grad_() for t in qkv]
    cuda_masks = {name: m.cuda() for name, m in masks.items()}
    out = sliding_window_attention(*cuda_qkv, **kw, **cuda_masks)
    grads = torch.autograd.grad(out, cuda_qkv, dy.float().cuda())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-3, atol=1e-4)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.cpu().double(), r, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_module_with_global_tokens_on_cuda_matches_cpu():
    torch.manual_seed(0)
    attn = SlidingWindowAttention(64, 4, window=16, causal=False, global_tokens=(0, 150, 999))
    x = torch.randn(2, 200, 64)
    pad = torch.zeros(2, 200, dtype=torch.bool)
    pad[1, 180:] = True
    refs = [attn(x), attn(x, pad_mask=pad)]
    attn.cuda()
    band_block_mask.cache_clear()
    for masks, ref in zip(({}, {"pad_mask": pad.cuda()}), refs, strict=True):
        torch.testing.assert_close(attn(x.cuda(), **masks).cpu(), ref, rtol=1e-4, atol=1e-5)
    attn(x.cuda())
    assert band_block_mask.cache_info().hits == 1  # the global tokens' mask, built once


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_module_on_cuda_matches_cpu_under_bf16_autocast():
    torch.manual_seed(0)
    attn = SlidingWindowAttention(64, 4, window=32, causal=True)
    x = torch.randn(2, 200, 64)
    ref = attn(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn.cuda()(x.cuda())
    assert (out.float().cpu() - ref).norm() / ref.norm() < 2e-2


def test_cuda_block_mask_does_not_break_a_compiled_graph(monkeypatch):
    """Under `model.compile=true` on CUDA each sliding-window layer builds (or looks up) its
    block mask inside the traced forward (Dynamo traces through the cache), with the
    options `_block_mask` picks for a CUDA device. That must not break the graph (a break in
    the layer loop leaves most of the model uncompiled); here the mask is built on the CPU with
    exactly those options."""
    from torch._dynamo.testing import CompileCounter

    real = flex_window.create_block_mask

    def built_here(mask_mod, B, H, Q_LEN, KV_LEN, device=None, *args, **kwargs):
        return real(mask_mod, B, H, Q_LEN, KV_LEN, "cpu", *args, **kwargs)  # CUDA's options

    monkeypatch.setattr(flex_window, "create_block_mask", built_here)
    band_block_mask.cache_clear()

    def layer(x: torch.Tensor) -> torch.Tensor:
        y = x.sin()
        mask = band_block_mask(x.shape[-1], 8, True, torch.device("cuda"))
        return y * mask.kv_num_blocks.sum()

    torch._dynamo.reset()
    graphs = CompileCounter()
    torch.compile(layer, backend=graphs)(torch.ones(2, 256))
    band_block_mask.cache_clear()
    assert graphs.frame_count == 1


def test_compiled_flex_keeps_compiling_new_lengths():
    """Prompts of different lengths (each `prefill`) reach the compiled FlexAttention with a new
    T each time. Past Dynamo's recompile limit (8 by default; 2 here) a function compiled for
    static shapes stops compiling and runs eagerly: FlexAttention's unfused implementation,
    which materialises the (B, H, T, T) scores, the O(T²) memory the window exists to avoid.
    New lengths must keep the fused kernel (here: no recompile-limit hit over 4 lengths)."""
    flex_window._compiled.cache_clear()
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
            for T in (20, 21, 22, 23):
                q, k, v = _qkv(T, seed=T)
                with torch.no_grad():
                    out = flex_window_attention(q, k, v, window=4, causal=True)
                ref = sliding_window_attention_reference(q, k, v, window=4, causal=True)
                torch.testing.assert_close(out, ref)
    finally:
        flex_window._compiled.cache_clear()
        torch._dynamo.reset()
