"""Blocked sliding-window attention against its dense reference, window counts, cost, step."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from advarch.models.blocks.sliding_window import (
    SlidingWindowAttention,
    sliding_window_attention,
    sliding_window_attention_reference,
)

F64 = torch.float64
# (T, window, block_size): odd lengths, T not divisible by the block, window 1, window > T
CASES = [(1, 1, None), (7, 1, 3), (33, 5, 4), (33, 8, None), (40, 100, 16), (65, 16, 8), (50, 7, 7)]


def masks(B: int, T: int, pad: bool, glob: bool, seed: int = 0):
    """Random right/left padding and a varying number of global tokens per row (row 0: none)."""
    gen = torch.Generator().manual_seed(seed)
    pad_mask = torch.rand(B, T, generator=gen) < 0.25 if pad else None
    global_mask = None
    if glob:
        global_mask = torch.rand(B, T, generator=gen) < 0.15
        global_mask[0] = False
        global_mask[-1, 0] = True
    return pad_mask, global_mask


def qkv(B: int, H: int, T: int, Dh: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, Dh, generator=gen, dtype=F64, requires_grad=True) for _ in "qkv"]


def assert_matches_reference(q, k, v, block_size: int | None, **kw) -> torch.Tensor:
    """`sliding_window_attention` equals the dense reference in outputs and q/k/v gradients."""
    out = sliding_window_attention(q, k, v, block_size=block_size, **kw)
    ref = sliding_window_attention_reference(q, k, v, **kw)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    for g, g_ref in zip(
        torch.autograd.grad(out, (q, k, v), grad),
        torch.autograd.grad(ref, (q, k, v), grad),
        strict=True,
    ):
        torch.testing.assert_close(g, g_ref)
    return out


@pytest.mark.parametrize("T,window,block_size", CASES)
@pytest.mark.parametrize("causal,glob", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("pad", [False, True])
def test_matches_dense_reference_outputs_and_grads(T, window, block_size, causal, glob, pad):
    q, k, v = qkv(3, 2, T, 4, seed=T + window)
    pad_mask, global_mask = masks(3, T, pad, glob, seed=T)
    kw = dict(window=window, causal=causal, pad_mask=pad_mask, global_mask=global_mask)
    out = assert_matches_reference(q, k, v, block_size=block_size, **kw)
    if pad:
        assert out.masked_select(pad_mask[:, None, :, None]).eq(0).all()


def attended(T: int, window: int, causal: bool, **masks_kw) -> torch.Tensor:
    """(B, T, T) bool: which keys each query attends, read off the blocked kernel itself with
    zero queries/keys (uniform attention over the allowed keys) and one-hot values."""
    B = 2
    zeros = torch.zeros(B, 1, T, T, dtype=F64)
    eye = torch.eye(T, dtype=F64).expand(B, 1, T, T)
    out = sliding_window_attention(zeros, zeros, eye, window=window, causal=causal, **masks_kw)
    return out[:, 0] > 0


@pytest.mark.parametrize("window", [1, 2, 4, 5, 8, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_window_key_set_matches_docstring_definition(window, causal):
    T = 37
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    expected = ((j > i - window) & (j <= i)) if causal else ((i - j).abs() <= window // 2)
    seen = attended(T, window, causal, block_size=4)
    assert torch.equal(seen, expected.expand_as(seen))
    counts = seen[0].sum(-1)
    if causal:  # w keys including itself, fewer at the start
        assert counts.tolist() == [min(window, t + 1) for t in range(T)]
    else:  # 2·(w // 2) + 1 keys away from the ends
        r = window // 2
        assert counts.tolist() == [min(t, r) + min(T - 1 - t, r) + 1 for t in range(T)]
    interior = {(1, True): 1, (4, True): 4, (5, True): 5, (4, False): 5, (5, False): 5}
    if (window, causal) in interior:
        assert counts[T // 2] == interior[window, causal]


def test_globals_and_padding_key_sets():
    T, window = 30, 4
    pad_mask = torch.zeros(2, T, dtype=torch.bool)
    pad_mask[1, -5:] = True
    global_mask = torch.zeros(2, T, dtype=torch.bool)
    global_mask[0, [0, 15]] = True
    global_mask[1, [3, 27]] = True  # 27 is padding: stays a padding token
    seen = attended(T, window, False, pad_mask=pad_mask, global_mask=global_mask)
    assert seen[0, 0].all() and seen[0, 15].all()  # global rows see everything
    assert seen[0, :, [0, 15]].all()  # everyone sees the globals
    assert seen[0, 7].sum() == 5 + 2  # band of 5 plus two globals outside it
    assert seen[0, 14].sum() == 5 + 1  # global 15 inside the band is counted once
    assert seen[1, 3].sum() == T - 5 and not seen[1, :, -5:].any()  # padding never attended
    assert not seen[1, -5:].any()  # padded rows are zeros (global flag ignored)


def test_padding_values_do_not_leak():
    q, k, v = qkv(2, 2, 21, 4)
    pad_mask, global_mask = masks(2, 21, pad=True, glob=True)
    kw = dict(window=6, causal=False, pad_mask=pad_mask, global_mask=global_mask)
    out = sliding_window_attention(q, k, v, **kw)
    noisy = [torch.where(pad_mask[:, None, :, None], 1e3 * torch.randn_like(x), x) for x in (k, v)]
    torch.testing.assert_close(sliding_window_attention(q, *noisy, **kw), out)


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any ATen op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def largest_tensor(T: int) -> int:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, 8, requires_grad=True) for _ in range(3))
    global_mask = torch.zeros(1, T, dtype=torch.bool)
    global_mask[0, [0, T // 2]] = True
    with MaxNumel() as mode:
        out = sliding_window_attention(
            q, k, v, window=32, causal=False, global_mask=global_mask, block_size=16
        )
        out.sum().backward()
    return mode.max_numel


def test_no_t_by_t_tensor_and_linear_growth():
    small, large = largest_tensor(1024), largest_tensor(2048)
    assert large < 2048 * 2048 / 16  # no T×T tensor anywhere, forward or backward
    assert large / small < 2.2  # memory grows linearly with T at a fixed window


def test_module_matches_reference_including_parameter_grads():
    torch.manual_seed(0)
    swa = SlidingWindowAttention(16, 4, window=6, causal=False, block_size=4).double()
    x = torch.randn(2, 19, 16, dtype=F64)
    pad_mask, global_mask = masks(2, 19, pad=True, glob=True)
    out = swa(x, pad_mask=pad_mask, global_mask=global_mask)
    grads = torch.autograd.grad(out.square().sum(), list(swa.parameters()))
    q, k, v = swa._qkv(x, torch.arange(19))
    ref = swa._merge(
        sliding_window_attention_reference(
            q, k, v, window=6, causal=False, pad_mask=pad_mask, global_mask=global_mask
        )
    )
    torch.testing.assert_close(out, ref)
    for g, g_ref in zip(
        grads, torch.autograd.grad(ref.square().sum(), list(swa.parameters())), strict=True
    ):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("window,T", [(4, 13), (1, 5), (16, 9)])
@pytest.mark.parametrize("rotary", [True, False])
def test_step_equals_forward(window, T, rotary):
    torch.manual_seed(0)
    swa = SlidingWindowAttention(16, 2, window=window, rotary=rotary).double().eval()
    x = torch.randn(3, T, 16, dtype=F64)
    state = swa.init_state(3, x.device, x.dtype)
    assert state.k.shape == (3, 2, window, 8)  # rolling cache: O(window) whatever T
    outs = []
    for t in range(T):
        y, state = swa.step(x[:, t : t + 1], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, dim=1), swa(x))


def test_bf16_autocast_runs_close_to_float32():
    torch.manual_seed(0)
    swa = SlidingWindowAttention(32, 4, window=8, causal=False)
    x = torch.randn(2, 45, 32)
    global_mask = torch.zeros(2, 45, dtype=torch.bool)
    global_mask[:, 0] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = swa(x, global_mask=global_mask)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), swa(x, global_mask=global_mask), atol=3e-2, rtol=5e-2)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in swa.parameters())


def test_dropout_only_in_training():
    torch.manual_seed(0)
    swa = SlidingWindowAttention(16, 2, window=4, dropout=0.5)
    x = torch.randn(1, 10, 16)
    assert not torch.equal(swa(x), swa(x))
    swa.eval()
    torch.testing.assert_close(swa(x), swa(x))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(window=0), r"model\.swa\.window=0"),
        (dict(dim=10, num_heads=3), r"model\.swa\.num_heads=3 must divide model\.dim=10"),
        (dict(dim=12, num_heads=4), r"must be even for model\.swa\.rotary"),
        (dict(dropout=1.0), r"model\.dropout=1\.0"),  # model.dropout: the key a user sets
        (dict(block_size=0), r"model\.swa\.block_size=0"),
        (dict(global_tokens=[-1]), r"model\.swa\.global_tokens=\[-1\] must be distinct"),
        (dict(global_tokens=[2, 2]), r"model\.swa\.global_tokens=\[2, 2\] must be distinct"),
    ],
)
def test_invalid_config_names_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlidingWindowAttention(**{"dim": 16, "num_heads": 2, **kwargs})


def test_global_tokens_are_a_global_mask_at_those_positions():
    # `model.swa.global_tokens`: the positions global in every row (one beyond T left out),
    # added to a caller's mask; outputs and parameter gradients as with that mask
    torch.manual_seed(0)
    fixed = SlidingWindowAttention(
        16, 4, window=4, causal=False, block_size=4, global_tokens=[7, 0, 40]
    ).double()
    plain = SlidingWindowAttention(16, 4, window=4, causal=False, block_size=4).double()
    plain.load_state_dict(fixed.state_dict())
    x = torch.randn(3, 19, 16, dtype=F64)
    pad_mask, given = masks(3, 19, pad=True, glob=True)
    at = torch.zeros(3, 19, dtype=torch.bool)
    at[:, [0, 7]] = True
    for caller, expected in ((None, at), (given, given | at)):
        out = fixed(x, pad_mask=pad_mask, global_mask=caller)
        ref = plain(x, pad_mask=pad_mask, global_mask=expected)
        torch.testing.assert_close(out, ref)
        grads = torch.autograd.grad(out.square().sum(), list(fixed.parameters()))
        refs = torch.autograd.grad(ref.square().sum(), list(plain.parameters()))
        for g, g_ref in zip(grads, refs, strict=True):
            torch.testing.assert_close(g, g_ref)
    assert not torch.allclose(fixed(x), plain(x))  # (window 4 of 19: they change every row)


def test_global_tokens_rejected_when_causal():
    with pytest.raises(ValueError, match=r"model\.swa\.global_tokens=\[0\] needs bidirectional"):
        SlidingWindowAttention(16, 2, window=4, causal=True, global_tokens=[0])
    swa = SlidingWindowAttention(16, 2, window=4, causal=True)
    with pytest.raises(ValueError, match=r"model\.swa\.causal=false"):
        swa(torch.randn(1, 5, 16), global_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal=false"):
        sliding_window_attention_reference(
            *qkv(1, 1, 5, 2), window=2, causal=True, global_mask=torch.ones(1, 5, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="model.swa.causal=true"):
        SlidingWindowAttention(16, 2, causal=False).init_state(1, "cpu", torch.float32)


def test_compiled_dropout_is_one_graph_and_exact():
    """`model.compile=true` keeps a model in one graph (tests/models/test_compile.py; a break in
    the layer loop leaves most of it uncompiled). With attention dropout the blocked path runs on
    CUDA too (FlexAttention has none): its keep-masks come from the default generator, so the
    compiled forward and backward are one graph and equal eager under the same seed."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch.manual_seed(0)
    attn = SlidingWindowAttention(32, 4, window=8, dropout=0.3).double()
    x = torch.randn(2, 21, 32, dtype=F64, requires_grad=True)

    def run(module):
        torch.manual_seed(1)
        y = module(x)
        return y, *torch.autograd.grad(y.square().sum(), x)

    torch._dynamo.reset()
    graphs = CompileCounterWithBackend("aot_eager")
    compiled = run(torch.compile(attn, backend=graphs))
    assert graphs.frame_count == 1
    for got, want in zip(compiled, run(attn), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
