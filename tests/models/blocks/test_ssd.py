"""Mamba-2 SSD: the chunked matmul form against the sequential recurrence, the block's decode
step against its forward, and its use in layer patterns."""

from __future__ import annotations

import pytest
import torch

from advarch.models.blocks.ssd import Mamba2, ssd_chunked, ssd_reference
from advarch.train import run
from tests.conftest import SMALL_TEXT


def _inputs(seed: int, T: int = 37) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B, H, P, N = 2, 3, 4, 5
    x = torch.randn(B, T, H, P, generator=g, dtype=torch.float64)
    dt = torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -torch.rand(H, generator=g, dtype=torch.float64) * 2 - 0.1
    Bm, C = (torch.randn(B, T, N, generator=g, dtype=torch.float64) for _ in "BC")
    h0 = torch.randn(B, H, P, N, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, dt, A, Bm, C, h0)]


@pytest.mark.parametrize("chunk", [1, 8, 16, 64])  # one step, several chunks with a partial
def test_chunked_matches_recurrence_in_outputs_state_and_gradients(chunk: int) -> None:
    *inputs, h0 = _inputs(seed=chunk)
    y, final = ssd_chunked(*inputs, chunk, initial_state=h0)
    y_ref, final_ref = ssd_reference(*inputs, initial_state=h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(final, final_ref)
    dy, dh = torch.randn_like(y), torch.randn_like(final)
    grads = torch.autograd.grad((y * dy).sum() + (final * dh).sum(), [*inputs, h0])
    ref = torch.autograd.grad((y_ref * dy).sum() + (final_ref * dh).sum(), [*inputs, h0])
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r)


def test_long_sequence_with_strong_decay_stays_finite() -> None:
    *inputs, _ = _inputs(seed=5, T=600)
    with torch.no_grad():
        inputs[1].mul_(40.0)  # Δa down to −100 per step: products underflow, sums must not NaN
    y, final = ssd_chunked(*inputs, 64)
    y_ref, _ = ssd_reference(*inputs)
    assert torch.isfinite(y).all() and torch.isfinite(final).all()
    torch.testing.assert_close(y, y_ref)


def test_step_by_step_decoding_equals_forward() -> None:
    torch.manual_seed(0)
    block = Mamba2(16, d_state=8, head_dim=8, chunk_size=8).double()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    state = block.init_state(2, "cpu", torch.float64)
    steps = []
    for t in range(x.shape[1]):
        y, state = block.step(x[:, t : t + 1], state)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, dim=1), block(x))


def test_block_is_causal_and_left_padding_is_inert() -> None:
    torch.manual_seed(0)
    block = Mamba2(16, d_state=8, head_dim=8, chunk_size=4)
    x = torch.randn(1, 12, 16)
    y = block(x)
    x2 = x.clone()
    x2[:, 8:] = torch.randn(1, 4, 16)
    torch.testing.assert_close(block(x2)[:, :8], y[:, :8])  # the future does not leak back
    padded = torch.cat([torch.randn(1, 3, 16), x], dim=1)
    pad = torch.zeros(1, 15, dtype=torch.bool)
    pad[:, :3] = True
    torch.testing.assert_close(block(padded, pad_mask=pad)[:, 3:], y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head_dim": 48}, "model.ssd.head_dim=48 must divide"),
        ({"d_state": 0}, "model.ssd.d_state=0 must be >= 1"),
        ({"dt_min": 0.5, "dt_max": 0.1}, "model.ssd.dt_min=0.5"),
    ],
)
def test_invalid_options_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Mamba2(32, **kwargs)


def test_hybrid_pattern_with_ssd_trains(make_cfg) -> None:
    overrides = ["model=mamba2", "model.layers=[ssd,attn]", "model.ssd.head_dim=16"]
    metrics = run(make_cfg(["debug=tiny", *SMALL_TEXT, *overrides, "test=false"]))
    assert metrics["val/loss"] < 5.5  # bytes: uniform is ln 256 ≈ 5.55
