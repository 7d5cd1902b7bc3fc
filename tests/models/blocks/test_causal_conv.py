"""The (B, T, C) causal depthwise convolution equals nn.Conv1d's, in outputs and gradients."""

import pytest
import torch
from torch import nn

from advarch.models.blocks.causal_conv import causal_conv, causal_conv_step


def conv1d_reference(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """The grouped convolution in channels-first layout, cut to the causal first T outputs."""
    return conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


@pytest.mark.parametrize("K", [1, 2, 4])
def test_causal_conv_matches_conv1d_in_outputs_and_gradients(K: int) -> None:
    torch.manual_seed(K)
    conv = nn.Conv1d(6, 6, K, groups=6, padding=K - 1).double()
    x = torch.randn(3, 11, 6, dtype=torch.float64, requires_grad=True)
    params = [x, conv.weight, conv.bias]
    ours, ref = causal_conv(conv, x), conv1d_reference(conv, x)
    torch.testing.assert_close(ours, ref)
    w = torch.randn_like(ref)
    for g, g_ref in zip(torch.autograd.grad((ours * w).sum(), params),
                        torch.autograd.grad((ref * w).sum(), params), strict=True):  # fmt: skip
        torch.testing.assert_close(g, g_ref)


def test_causal_conv_is_causal_and_the_step_reproduces_each_position() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 4, 4, groups=4, padding=3)
    x = torch.randn(2, 9, 4)
    y = causal_conv(conv, x)
    later = x.clone()
    later[:, 5:] += 1.0
    torch.testing.assert_close(causal_conv(conv, later)[:, :5], y[:, :5])
    padded = torch.cat([torch.zeros(2, 3, 4), x], dim=1)
    for t in range(9):
        torch.testing.assert_close(causal_conv_step(conv, padded[:, t : t + 4]), y[:, t : t + 1])
