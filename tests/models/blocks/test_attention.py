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


def test_float32_causal_padded_attention_matches_the_float64_reference() -> None:
    """The path training takes (float32 SDPA with an explicit causal ∧ padding mask), outputs
    and gradients of the input and every weight, against the float64 formula."""
    torch.manual_seed(0)
    att = Attention(16, 4, causal=True, rotary=False)
    ref = Attention(16, 4, causal=True, rotary=False).double()
    ref.load_state_dict({k: v.double() for k, v in att.state_dict().items()})
    x = torch.randn(2, 9, 16)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True  # right padding on the second row
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    got, want = att(x32, pad_mask=pad), reference(ref, x64, pad)
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(want)  # a random cotangent reaches every output position
    (got * weight.float()).sum().backward()
    (want * weight).sum().backward()
    torch.testing.assert_close(x32.grad, x64.grad.float(), rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(att.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=1e-4, atol=1e-5, msg=name)


def test_cross_attention_reads_only_real_memory() -> None:
    """Cross-attention: queries from x, keys and values from the memory, padded memory slots
    ignored (a written-out softmax over the memory in float64)."""
    torch.manual_seed(0)
    att = Attention(16, 4, cross=True).double()
    x, memory = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 7, 16).double()
    memory_pad = torch.zeros(2, 7, dtype=torch.bool)
    memory_pad[0, 4:] = True
    h, dh = att.num_heads, att.head_dim
    q = att.q_proj(x).view(2, 5, h, dh).transpose(1, 2)
    k, v = (y.view(2, 7, h, dh).transpose(1, 2) for y in att.kv_proj(memory).chunk(2, dim=-1))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(
        memory_pad[:, None, None, :], float("-inf")
    )
    want = att.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16))
    got = att(x, memory=memory, memory_pad_mask=memory_pad)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    changed = memory.clone()
    changed[0, 4:] = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(att(x, memory=changed, memory_pad_mask=memory_pad), got)
    with pytest.raises(ValueError, match="needs an encoder memory"):
        att(x)


def test_kv_cache_steps_equal_the_full_causal_forward() -> None:
    """Decoding token by token through `step` (rotary positions from the cache) reproduces the
    causal forward at every position."""
    torch.manual_seed(0)
    att = Attention(16, 4).double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    state = att.init_state(2, x.device, x.dtype)
    steps = []
    for t in range(x.shape[1]):
        out, state = att.step(x[:, t : t + 1], state)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, dim=1), att(x), rtol=1e-10, atol=1e-10)
    assert state["pos"] == 6 and state["k"].shape == (2, 4, 6, 4)
