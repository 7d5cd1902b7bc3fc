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
def test_module_on_cuda_matches_cpu_under_bf16_autocast():
    torch.manual_seed(0)
    attn = SlidingWindowAttention(64, 4, window=32, causal=True)
    x = torch.randn(2, 200, 64)
    ref = attn(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn.cuda()(x.cuda())
    assert (out.float().cpu() - ref).norm() / ref.norm() < 2e-2
