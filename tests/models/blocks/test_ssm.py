"""Tests for the selective SSM block: parallel scan vs sequential reference, step vs forward."""

from __future__ import annotations

import pytest
import torch

from advarch.models.blocks.ssm import SelectiveSSM, selective_scan, selective_scan_reference


def _scan_inputs(batch: int, length: int, inner: int, state: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    delta = torch.rand(batch, length, inner, generator=g, dtype=torch.float64) * 2 + 1e-3
    A = -(torch.rand(inner, state, generator=g, dtype=torch.float64) * 8 + 0.1)
    return (rand(batch, length, inner), delta.requires_grad_(), A.requires_grad_(),
            rand(batch, length, state), rand(batch, length, state), rand(inner),
            rand(batch, length, inner))  # fmt: skip


SHAPES = [(1, 1, 3, 2, 0), (2, 37, 5, 4, 1), (3, 64, 4, 3, 2), (1, 129, 6, 16, 3)]


@pytest.mark.parametrize(("batch", "length", "inner", "state", "seed"), SHAPES)
@pytest.mark.parametrize("gate", [True, False])
def test_selective_scan_matches_reference(batch, length, inner, state, seed, gate):
    inputs = _scan_inputs(batch, length, inner, state, seed)
    if not gate:
        inputs = inputs[:-1]
    fast, ref = selective_scan(*inputs), selective_scan_reference(*inputs)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(ref)
    for gf, gr in zip(torch.autograd.grad(fast, inputs, grad_out),
                      torch.autograd.grad(ref, inputs, grad_out), strict=True):  # fmt: skip
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-9)


def test_scan_survives_huge_decays_and_long_sequences():
    u, delta, A, B, C, D, _ = (t.detach().float() for t in _scan_inputs(1, 4096, 4, 16, 4))
    delta[:, ::7] = 50.0  # per-step log-decays down to -400: exp of positives would overflow
    y = selective_scan(u, delta, A, B, C, D)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:, :300], selective_scan_reference(u, delta, A, B, C, D)[:, :300],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def _block(**kwargs) -> SelectiveSSM:
    torch.manual_seed(0)
    return SelectiveSSM(8, d_state=4, d_conv=3, expand=2, **kwargs).double()


@pytest.mark.parametrize("selective", [True, False])
def test_step_equals_forward(selective):
    block = _block(selective=selective)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    full = block(x)
    state = block.init_state(2, x.device, x.dtype)
    steps = []
    for t in range(x.shape[1]):
        y, state = block.step(x[:, t : t + 1], state)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


def test_block_is_causal_and_selectivity_changes_behaviour():
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    block = _block()
    x2 = x.clone()
    x2[:, 7:] += 1.0
    torch.testing.assert_close(block(x2)[:, :7], block(x)[:, :7])
    lti = _block(selective=False)
    assert not hasattr(lti, "x_proj") and lti.B.shape == (4,)


def test_left_padding_leaves_real_tokens_unchanged():
    block = _block()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    padded = torch.cat([torch.randn(1, 3, 8, dtype=torch.float64), x], 1)
    pad_mask = torch.tensor([[True] * 3 + [False] * 6])
    torch.testing.assert_close(block(padded, pad_mask=pad_mask)[:, 3:], block(x))


def test_init_matches_mamba():
    block = SelectiveSSM(32, d_state=16, dt_min=1e-3, dt_max=0.1)
    delta = torch.nn.functional.softplus(block.dt_proj.bias)
    assert delta.min() >= 1e-3 * 0.999 and delta.max() <= 0.1 * 1.001
    torch.testing.assert_close(-torch.exp(block.A_log[0]), -torch.arange(1, 17.0))
    assert block.dt_rank == 2 and block.x_proj.out_features == 2 + 32


def test_long_sequence_forward_backward_is_finite():
    torch.manual_seed(0)
    block = SelectiveSSM(4, d_state=4, expand=1)
    with torch.no_grad():
        block.dt_proj.bias.fill_(5.0)  # large steps: strong decays everywhere
    x = torch.randn(1, 16384, 4, requires_grad=True)
    block(x).square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())


def test_bf16_autocast_runs_scan_in_float32():
    block = _block().float()
    x = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = block(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), block(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"d_state": 0}, "model.ssm.d_state=0"),
    ({"dt_rank": 0}, "model.ssm.dt_rank=0"),
    ({"dt_min": 0.5, "dt_max": 0.1}, "model.ssm.dt_min=0.5"),
])  # fmt: skip
def test_invalid_arguments_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SelectiveSSM(8, **kwargs)
