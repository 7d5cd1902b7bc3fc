"""The Triton selective scan against the sequential reference: outputs and every gradient.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest
before anything imports Triton), at sizes that cover several time chunks, a partial last
chunk, a partial channel block and a state size that is not a power of two.
"""

from __future__ import annotations

import pytest
import torch

from advarch.benchmarks.gpu import SCAN_TILES
from advarch.models.blocks.ssm import SelectiveSSM, selective_scan, selective_scan_reference

pytest.importorskip("triton")
triton_scan = pytest.importorskip("advarch.models.blocks.selective_scan_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAUNCHED_TILES = (triton_scan.CHUNK, triton_scan.BLOCK_E, triton_scan.NUM_WARPS)  # the defaults


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


def test_kernel_lookup_does_not_break_a_compiled_graph():
    """On CUDA `selective_scan` looks its kernel module up with `triton_module` inside the
    model's forward, so under `model.compile=true` that lookup is traced by Dynamo. It must not
    break the graph: a break in the layer loop leaves most of the model uncompiled (every SSM
    layer on a GPU). The CPU compile test cannot see this (the CPU branch never looks it up)."""
    from torch._dynamo.testing import CompileCounter

    from advarch.models.blocks.triton_modules import triton_module

    triton_module("selective_scan_triton")  # cached eagerly first, as after an eager step

    def layer(x: torch.Tensor) -> torch.Tensor:  # ops, then selective_scan's lookup, then ops
        u = torch.nn.functional.silu(x)
        module = triton_module("selective_scan_triton")
        return u * 2 if module is not None else u

    torch._dynamo.reset()
    graphs = CompileCounter()
    torch.compile(layer, backend=graphs)(torch.ones(3))
    assert graphs.frame_count == 1  # one graph; a break makes it 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tiles", [LAUNCHED_TILES, *SCAN_TILES])
def test_cuda_scan_at_launched_and_swept_tiles(tiles, monkeypatch):
    """The other tests here run at 8×8 tiles; on a GPU the layout of the reverse associative
    scan (the adjoint) depends on the tile shape and warps, so check the tiles the block
    launches and each tile `bench --device cuda` sweeps (and then keeps for its Mamba rows):
    outputs and every gradient against the reference."""
    for name, value in zip(("CHUNK", "BLOCK_E", "NUM_WARPS"), tiles, strict=True):
        monkeypatch.setattr(triton_scan, name, value)
    ref_in = _inputs(2, 75, 40, 16, seed=7)
    y = selective_scan_reference(*ref_in)
    dy = torch.randn_like(y)
    ref_grads = torch.autograd.grad(y, ref_in, dy)
    fast_in = [t.detach().float().cuda().requires_grad_() for t in ref_in]
    out = triton_scan.triton_selective_scan(*fast_in)
    grads = torch.autograd.grad(out, fast_in, dy.float().cuda())
    assert _rel(out, y) < 1e-5
    for name, g, r in zip(("u", "delta", "A", "B", "C", "D", "z"), grads, ref_grads, strict=True):
        assert _rel(g, r) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scan_past_int32_offsets(monkeypatch):
    """T 2¹⁸, E 2¹³, N 16: u, Δ, y and their gradients hold 2³¹ elements and the saved
    chunk-start states 2³², so their offsets pass int32 (they wrapped when computed in int32).
    Channels are independent: the last channel block's outputs and input gradients equal a
    run of that block alone."""
    for name, value in zip(("CHUNK", "BLOCK_E", "NUM_WARPS"), LAUNCHED_TILES, strict=True):
        monkeypatch.setattr(triton_scan, name, value)
    g = torch.Generator("cuda").manual_seed(0)
    T, E, N, block = 2**18, 2**13, 16, LAUNCHED_TILES[1]
    u = torch.randn(1, T, E, device="cuda", dtype=torch.bfloat16, generator=g)
    delta = (torch.rand(1, T, E, device="cuda", generator=g) * 0.5 + 0.01).bfloat16()
    A = -torch.rand(E, N, device="cuda", generator=g) - 0.1
    B, C = (torch.randn(1, T, N, device="cuda", generator=g) for _ in "BC")
    D = torch.zeros(E, device="cuda")

    def run(u, delta, A, D):
        u, delta = u.detach().requires_grad_(), delta.detach().requires_grad_()
        y = triton_scan.triton_selective_scan(u, delta, A, B, C, D)
        du, ddelta = torch.autograd.grad(y, (u, delta), torch.ones_like(y))
        return y[..., -block:], du[..., -block:], ddelta[..., -block:]

    whole = run(u, delta, A, D)
    alone = run(u[..., -block:], delta[..., -block:], A[-block:], D[-block:])
    for got, want in zip(whole, alone, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
