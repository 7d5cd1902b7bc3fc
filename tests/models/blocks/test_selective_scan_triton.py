"""The Triton selective scan against the sequential reference: outputs and every gradient.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest
before anything imports Triton), at sizes that cover several time chunks, a partial last
chunk, a partial channel block and a state size that is not a power of two.
"""

from __future__ import annotations

import pytest
import torch

from advarch.models.blocks.ssm import SelectiveSSM, selective_scan, selective_scan_reference

pytest.importorskip("triton")
triton_scan = pytest.importorskip("advarch.models.blocks.selective_scan_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Small chunks and channel blocks: several of each at test sizes, fast in the interpreter."""
    monkeypatch.setattr(triton_scan, "CHUNK", 8)
    monkeypatch.setattr(triton_scan, "BLOCK_E", 8)


def _inputs(batch: int, length: int, inner: int, state: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u, z = (torch.randn(batch, length, inner, generator=g, dtype=torch.float64) for _ in "uz")
    delta = torch.rand(batch, length, inner, generator=g, dtype=torch.float64) * 0.5 + 0.01
    A = -torch.rand(inner, state, generator=g, dtype=torch.float64) * 2 - 0.1
    B, C = (torch.randn(batch, length, state, generator=g, dtype=torch.float64) for _ in "BC")
    D = torch.randn(inner, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double().cpu() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gate", [True, False])
def test_outputs_and_all_gradients_match_reference(gate):
    ref_in = _inputs(2, 19, 12, 3, seed=int(gate))
    if not gate:
        ref_in = ref_in[:-1]
    y = selective_scan_reference(*ref_in)
    dy = torch.randn_like(y)
    ref_grads = torch.autograd.grad(y, ref_in, dy)
    fast_in = [t.detach().float().to(DEVICE).requires_grad_() for t in ref_in]
    out = triton_scan.triton_selective_scan(*fast_in)
    grads = torch.autograd.grad(out, fast_in, dy.float().to(DEVICE))
    assert out.dtype == torch.float32
    assert _rel(out, y) < 1e-5
    for name, g, r in zip(("u", "delta", "A", "B", "C", "D", "z"), grads, ref_grads, strict=False):
        assert _rel(g, r) < 1e-5, name


def test_last_state_matches_reference():
    """The state after the last step (a partial last chunk, a partial channel block)."""
    inputs = [t.detach() for t in _inputs(2, 21, 12, 3, seed=5)]
    _, h_ref = selective_scan_reference(*inputs, return_last_state=True)
    fast = [t.float().to(DEVICE) for t in inputs]
    y, h = triton_scan.triton_selective_scan(*fast, return_last_state=True)
    assert h.shape == (2, 12, 3) and h.dtype == torch.float32
    assert _rel(h, h_ref) < 1e-5
    torch.testing.assert_close(y, triton_scan.triton_selective_scan(*fast), rtol=0, atol=0)


def test_bfloat16_inputs_keep_a_float32_state():
    inputs = _inputs(1, 17, 8, 4, seed=3)
    y = selective_scan_reference(*inputs)
    half = [t.detach().to(DEVICE) for t in inputs]
    half[0], half[6] = half[0].bfloat16(), half[6].bfloat16()  # u and z, as under autocast
    out = triton_scan.triton_selective_scan(*(t if t.dtype == torch.bfloat16 else t.float()
                                              for t in half))  # fmt: skip
    assert out.dtype == torch.float32
    assert _rel(out, y) < 2e-2


def test_no_grad_forward_saves_no_states_and_agrees():
    inputs = [t.detach().float().to(DEVICE) for t in _inputs(2, 9, 8, 2, seed=4)]
    with torch.no_grad():
        out = triton_scan.triton_selective_scan(*inputs)
    assert _rel(out, selective_scan_reference(*(t.double().cpu() for t in inputs))) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_block_dispatches_to_triton_and_matches_cpu(monkeypatch):
    calls = []
    real = triton_scan.triton_selective_scan

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(triton_scan, "triton_selective_scan", counted)
    inputs = [t.detach().float() for t in _inputs(2, 40, 24, 5, seed=5)]
    out = selective_scan(*(t.cuda() for t in inputs))
    assert calls == [1]
    assert _rel(out, selective_scan_reference(*(t.double() for t in inputs))) < 1e-5
    torch.manual_seed(0)
    block = SelectiveSSM(32, d_state=8)
    x = torch.randn(2, 64, 32)
    ref = block(x)
    torch.testing.assert_close(block.cuda()(x.cuda()).cpu(), ref, rtol=1e-4, atol=1e-5)
