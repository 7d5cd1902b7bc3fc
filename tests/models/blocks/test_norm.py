"""RMSNorm: the formula, float64 kept whole (gradcheck), bf16 computed in float32."""

from __future__ import annotations

import torch

from advarch.models.blocks.norm import RMSNorm


def test_rmsnorm_matches_torch_and_keeps_float64() -> None:
    norm = RMSNorm(6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    expected = torch.nn.functional.rms_norm(x, (6,), norm.weight, eps=norm.eps)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(norm, (x,))


def test_rmsnorm_computes_bfloat16_in_float32() -> None:
    norm = RMSNorm(64)
    x = torch.randn(4, 64) * 100
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x.bfloat16().float()), rtol=8e-3, atol=8e-3)
