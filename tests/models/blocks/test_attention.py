"""Dense attention against a written-out softmax(QKᵀ/√d + mask) V in float64."""

from __future__ import annotations

import math

import pytest
import torch

from advarch.models.blocks.attention import Attention


def reference(att: Attention, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention by hand (no rotary): per head softmax(q kᵀ / √dh + mask) v."""
    b, t, d = x.shape
    h, dh = att.num_heads, att.head_dim
    q = att.q_proj(x).view(b, t, h, dh).transpose(1, 2)
    k, v = (y.view(b, t, h, dh).transpose(1, 2) for y in att.kv_proj(x).chunk(2, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (B, H, T, T)
    keep = torch.ones(t, t, dtype=torch.bool)
    if att.causal:
        keep = keep.tril()
    keep = keep.expand(b, 1, t, t)
    if pad is not None:
        keep = (keep & ~pad[:, None, None, :]) | torch.eye(t, dtype=torch.bool)
    out = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    return att.out_proj(out.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("causal", [True, False])
def test_attention_equals_the_written_out_formula(causal: bool) -> None:
    torch.manual_seed(0)
    att = Attention(16, 4, causal=causal, rotary=False).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    got, want = att(x), reference(att, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    (g_got,) = torch.autograd.grad(got.square().sum(), x)
    (g_want,) = torch.autograd.grad(want.square().sum(), x)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


def test_padding_keys_are_ignored() -> None:
    torch.manual_seed(0)
    att = Attention(16, 4, causal=False, rotary=False).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[False, False, False, False, True, True]])
    torch.testing.assert_close(att(x, pad_mask=pad), reference(att, x, pad))
    y = x.clone()
    y[:, 4:] = torch.randn(2, 16)  # what padding holds changes nothing for real tokens
    torch.testing.assert_close(att(y, pad_mask=pad)[:, :4], att(x, pad_mask=pad)[:, :4])


def test_causal_attention_ignores_the_future() -> None:
    torch.manual_seed(0)
    att = Attention(16, 4).double()  # rotary on, as the models use it
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    y = x.clone()
    y[:, 5:] += 1.0
    torch.testing.assert_close(att(y)[:, :5], att(x)[:, :5])
    assert not torch.allclose(att(y)[:, 5:], att(x)[:, 5:])
