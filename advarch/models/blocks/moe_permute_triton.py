"""Moving MoE token rows to expert order and back for GPUs in Triton: each move one kernel.

`DroplessExperts` permutes token-slots into expert order, runs the experts, and mixes each
token's K outputs by its gates; in torch each step is a cast, an index, a gather, a multiply
and a sum (a launch each, and (N·K, D) intermediates in memory). Here:

- `gather_rows`: xs[r] = x[order[r] // K] in the experts' dtype (the cast fused in);
- `combine`: y[n] = Σ_k g[n, k] · out[inverse[n·K + k]], accumulated in float32 (gates None:
  the plain sum, which is also the backward of `gather_rows`);
- `combine_backward`: for each row r of expert order, slot s = order[r] of token n = s // K,
  grad_out[r] = g[s] · grad_y[n] and grad_g[s] = out[r] · grad_y[n].

One program per block of rows walks D in tiles. Gathers only: no atomics, deterministic.
Shapes: N tokens, K experts per token, S = N·K slots, D model dim.
Import only where Triton is installed; tests run it on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# rows per program, columns per step, warps: 16-byte bf16 accesses per thread; ptxas for sm_90:
# 94–118 registers, no spills (219 at 4 warps)
BLOCK_R, BLOCK_D, NUM_WARPS = 16, 128, 8


@triton.jit
def _gather_rows_kernel(x_ptr, order_ptr, xs_ptr, S, D, K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # S·D > 2³¹
    row_ok = rows < S
    token = tl.load(order_ptr + rows, mask=row_ok, other=0) // K
    for d in range(0, D, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        v = tl.load(x_ptr + token[:, None] * D + cols[None, :], mask=ok)
        v = v.to(xs_ptr.dtype.element_ty)  # rounded to nearest even, as torch casts
        tl.store(xs_ptr + rows[:, None] * D + cols[None, :], v, mask=ok)


@triton.jit
def _combine_kernel(out_ptr, inverse_ptr, gates_ptr, y_ptr, N, D, K: tl.constexpr,
                    HAS_GATES: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_D: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # S·D > 2³¹
    row_ok = rows < N
    for d in range(0, D, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
        for k in tl.static_range(K):
            src = tl.load(inverse_ptr + rows * K + k, mask=row_ok, other=0)
            v = tl.load(out_ptr + src[:, None] * D + cols[None, :], mask=ok, other=0.0)
            if HAS_GATES:
                g = tl.load(gates_ptr + rows * K + k, mask=row_ok, other=0.0)
                acc += g[:, None] * v.to(tl.float32)
            else:
                acc += v.to(tl.float32)
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=ok)  # fmt: skip


@triton.jit
def _combine_backward_kernel(grad_y_ptr, out_ptr, gates_ptr, order_ptr, grad_out_ptr,
                             grad_gates_ptr, S, D, K: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_D: tl.constexpr):  # fmt: skip
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # S·D > 2³¹
    row_ok = rows < S
    slot = tl.load(order_ptr + rows, mask=row_ok, other=0)
    token = slot // K
    g = tl.load(gates_ptr + slot, mask=row_ok, other=0.0)
    dot = tl.zeros((BLOCK_R,), tl.float32)
    for d in range(0, D, BLOCK_D):
        cols = d + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < D)[None, :]
        gy = tl.load(grad_y_ptr + token[:, None] * D + cols[None, :], mask=ok, other=0.0)
        gy = gy.to(tl.float32)
        v = tl.load(out_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
        dot += tl.sum(v.to(tl.float32) * gy, 1)
        tl.store(grad_out_ptr + rows[:, None] * D + cols[None, :],
                 (g[:, None] * gy).to(grad_out_ptr.dtype.element_ty), mask=ok)  # fmt: skip
    tl.store(grad_gates_ptr + slot, dot, mask=row_ok)


def gather_rows(x: torch.Tensor, order: torch.Tensor, top_k: int, dtype: torch.dtype
                ) -> torch.Tensor:  # fmt: skip
    """x[order // top_k] in `dtype`: (S, D) rows in expert order."""
    S, D = order.shape[0], x.shape[1]
    xs = x.new_empty(S, D, dtype=dtype)
    _gather_rows_kernel[(triton.cdiv(S, BLOCK_R),)](
        x.contiguous(), order, xs, S, D, K=top_k, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return xs


def combine(out: torch.Tensor, inverse: torch.Tensor, gates: torch.Tensor | None, top_k: int,
            dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """(N, D) in `dtype`: each token's K rows of out (S, D), weighted by gates (N, K) if given."""
    N, D = inverse.shape[0] // top_k, out.shape[1]
    y = out.new_empty(N, D, dtype=dtype)
    _combine_kernel[(triton.cdiv(N, BLOCK_R),)](
        out.contiguous(), inverse, inverse if gates is None else gates.contiguous(), y, N, D,
        K=top_k, HAS_GATES=gates is not None, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return y


def combine_backward(grad_y: torch.Tensor, out: torch.Tensor, gates: torch.Tensor,
                     order: torch.Tensor, inverse: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`combine`'s gradients: for out (S, D) in expert order, in out's dtype, and for the
    float32 gates (N, K). (``inverse`` is unused: the signature of the torch reference.)"""
    S, D = out.shape
    grad_out = torch.empty_like(out)
    grad_gates = gates.new_empty(gates.shape, dtype=torch.float32)
    _combine_backward_kernel[(triton.cdiv(S, BLOCK_R),)](
        grad_y.contiguous(), out, gates.contiguous(), order, grad_out, grad_gates, S, D,
        K=gates.shape[1], BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
    )  # fmt: skip
    return grad_out, grad_gates
