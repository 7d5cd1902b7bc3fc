"""Top-k MoE routing for GPUs in Triton: softmax, selection, gates, the permutation into expert
order and the router's losses and statistics in three small kernels, their gradient in one.

On a GPU the eager MoE block is bound by per-op host overhead (issue 14), and routing was a
third of its ops: softmax, top-k, gather, a second softmax, the expert counts (three ops), a
stable sort by expert and its inverse, the offsets, the balance loss, logsumexp (several
kernels) and the z-loss, the entropy — each a launch, most an autograd node.

1. `_route_fwd_kernel`, one program per block of tokens, their logits a (tokens, E) tile:
   p = softmax(l), lse = logsumexp(l), the K largest of p (+ the selection bias), the gates
   (softmax of the chosen logits, or the chosen p for K = 1: Switch), the block's expert
   counts and its partial sums of p, lse² and the entropy −Σ p log p.
2. `_route_finish_kernel`, one program walking the blocks in order: each block's start among
   each expert's slots, the counts and end offsets, then load, balance loss, z-loss, entropy
   and the weighted aux loss (a fixed summation order: deterministic, no float atomics).
3. `_route_place_kernel`, per block: every slot's place in expert order, expert start + block
   start + rank in the block, i.e. the stable sort by expert (`order`) and its inverse.

The backward kernel forms dL/dl from the gates' gradient and the aux loss's (balance:
dL/dp_e = c_e, so dL/dl = p ⊙ (c − pᵀc); z-loss: dL/dl = (2 w_z lse / N) p), with p recomputed
from l and lse. Masked experts (−inf logits) get p = 0, are never chosen and get no gradient,
as in `MoE._route`'s composition of torch ops, which is this module's plain reference.

Shapes: N tokens, E experts (padded to a power of two on chip), K experts per token.
Import only where Triton is installed; tests run it on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# Logits a program holds: 64 tokens of up to 16 experts, fewer tokens beyond. ptxas for sm_90
# at 4 warps, E 8 … 512: 48–106 registers, no spills (4096 spilled at 64 experts).
TILE = 1024


def _tiles(num_experts: int) -> tuple[int, int]:
    """(BLOCK_N tokens, BLOCK_E experts ≥ E) of a program."""
    block_e = triton.next_power_of_2(num_experts)
    return max(2, min(64, TILE // block_e)), block_e


@triton.jit
def _route_fwd_kernel(
    logits_ptr, bias_ptr, expert_ptr, gates_ptr, lse_ptr, block_counts_ptr, partial_ptr,
    N, E,
    K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N·E may pass 2³¹
    cols, ks = tl.arange(0, BLOCK_E), tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < N, cols < E
    tile_ok = row_ok[:, None] & col_ok[None, :]
    at = rows[:, None] * E + cols[None, :]
    logit = tl.load(logits_ptr + at, mask=tile_ok, other=-float("inf"))
    m = tl.where(row_ok, tl.max(logit, 1), 0.0)  # padding rows are all −inf
    ex = tl.exp(logit - m[:, None])
    s = tl.where(row_ok, tl.sum(ex, 1), 1.0)
    p = ex / s[:, None]
    lse = m + tl.log(s)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    scores = p
    if HAS_BIAS:
        scores += tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    scores = tl.where(logit > -float("inf"), scores, -float("inf"))  # no masked one revived
    # top-k: K rounds of argmax, largest first as torch.topk; the choices fill (BLOCK_N, BLOCK_K)
    idx = tl.zeros((BLOCK_N, BLOCK_K), tl.int64)
    chosen = tl.full((BLOCK_N, BLOCK_K), -float("inf"), tl.float32)  # logit, or p for K = 1
    counts = tl.zeros((BLOCK_E,), tl.int32)
    picked = p  # what a choice records: its probability (K = 1: Switch's gate) or its logit
    if K > 1:
        picked = logit
    for k in tl.static_range(K):
        best = tl.argmax(scores, 1)
        hit = cols[None, :] == best[:, None]
        scores = tl.where(hit, -float("inf"), scores)
        counts += tl.sum((hit & row_ok[:, None]).to(tl.int32), 0)
        value = tl.sum(tl.where(hit, picked, 0.0), 1)
        slot = ks[None, :] == k
        idx = tl.where(slot, best[:, None].to(tl.int64), idx)
        chosen = tl.where(slot, value[:, None], chosen)
    if K == 1:
        gates = chosen  # Switch: the raw probability
    else:  # softmax over the chosen logits
        top = tl.where(row_ok, tl.max(chosen, 1), 0.0)
        e = tl.exp(chosen - top[:, None])
        gates = e / tl.where(row_ok, tl.sum(e, 1), 1.0)[:, None]
    out_ok = row_ok[:, None] & (ks[None, :] < K)
    tl.store(expert_ptr + rows[:, None] * K + ks[None, :], idx, mask=out_ok)
    tl.store(gates_ptr + rows[:, None] * K + ks[None, :], gates, mask=out_ok)
    tl.store(block_counts_ptr + pid * E + cols, counts, mask=col_ok)
    p = tl.where(tile_ok, p, 0.0)
    entropy = -tl.sum(p * tl.log(tl.where(p > 0, p, 1.0)), 1)
    out = partial_ptr + pid * (E + 2)
    tl.store(out + cols, tl.sum(p, 0), mask=col_ok)
    tl.store(out + E, tl.sum(tl.where(row_ok, lse * lse, 0.0), 0))
    tl.store(out + E + 1, tl.sum(tl.where(row_ok, entropy, 0.0), 0))


@triton.jit
def _route_finish_kernel(
    partial_ptr, block_counts_ptr, block_start_ptr, counts_ptr, offsets_ptr, out_ptr,
    blocks, N, E, slots, balance_weight, z_weight,
    BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """One program, over the blocks in order: each block's first slot per expert among the
    expert's slots, the counts, their running sum (end offsets), and out = (load (E), aux,
    balance, z-loss, entropy) from the partial sums."""
    cols, two = tl.arange(0, BLOCK_E), tl.arange(0, 2)
    col_ok = cols < E
    p_sum = tl.zeros((BLOCK_E,), tl.float32)
    tail = tl.zeros((2,), tl.float32)  # Σ lse², Σ entropy
    counts = tl.zeros((BLOCK_E,), tl.int32)
    for first in range(0, blocks, BLOCK_B):
        b = first + tl.arange(0, BLOCK_B)
        tile_ok = (b < blocks)[:, None] & col_ok[None, :]
        c = tl.load(block_counts_ptr + b[:, None] * E + cols[None, :], mask=tile_ok, other=0)
        start = counts[None, :] + tl.cumsum(c, 0) - c
        tl.store(block_start_ptr + b[:, None] * E + cols[None, :], start, mask=tile_ok)
        counts += tl.sum(c, 0)
        row = partial_ptr + b[:, None] * (E + 2)
        p_sum += tl.sum(tl.load(row + cols[None, :], mask=tile_ok, other=0.0), 0)
        tail += tl.sum(tl.load(row + E + two[None, :], mask=(b < blocks)[:, None], other=0.0), 0)
    tl.store(counts_ptr + cols, counts, mask=col_ok)
    tl.store(offsets_ptr + cols, tl.cumsum(counts, 0), mask=col_ok)
    tail = tail / N
    load = counts.to(tl.float32) / slots
    balance = E * tl.sum(load * p_sum / N, 0)
    z_loss = tl.sum(tl.where(two == 0, tail, 0.0), 0)
    tl.store(out_ptr + cols, load, mask=col_ok)
    tl.store(out_ptr + E, balance_weight * balance + z_weight * z_loss)
    tl.store(out_ptr + E + 1, balance)
    tl.store(out_ptr + E + 2 + two, tail)


@triton.jit
def _route_place_kernel(
    expert_ptr, block_start_ptr, counts_ptr, offsets_ptr, order_ptr, inverse_ptr, N, E,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Per block of tokens: each slot's place in expert order (stable: by expert, then slot),
    as the expert's start + the block's start among its slots + the rank within the block."""
    pid = tl.program_id(0)
    local = tl.arange(0, BLOCK_S)
    slot = pid * BLOCK_N * K + local
    ok = (local < BLOCK_N * K) & (slot < N * K)
    e = tl.load(expert_ptr + slot, mask=ok, other=0)
    cols = tl.arange(0, BLOCK_E)
    hit = ((e[:, None] == cols[None, :]) & ok[:, None]).to(tl.int32)  # (BLOCK_S, BLOCK_E)
    rank = tl.sum((tl.cumsum(hit, 0) - hit) * hit, 1)
    first = tl.load(offsets_ptr + e, mask=ok, other=0) - tl.load(counts_ptr + e, mask=ok, other=0)
    dest = (first + tl.load(block_start_ptr + pid * E + e, mask=ok, other=0) + rank).to(tl.int64)
    tl.store(inverse_ptr + slot, dest, mask=ok)
    tl.store(order_ptr + dest, slot.to(tl.int64), mask=ok)


@triton.jit
def _route_bwd_kernel(
    logits_ptr, lse_ptr, expert_ptr, gates_ptr, grad_gates_ptr, grad_aux_ptr, load_ptr,
    grad_logits_ptr, N, E, balance_scale, z_scale,
    K: tl.constexpr, HAS_GATES: tl.constexpr, HAS_AUX: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rows = (pid * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N·E may pass 2³¹
    cols = tl.arange(0, BLOCK_E)
    row_ok, col_ok = rows < N, cols < E
    tile_ok = row_ok[:, None] & col_ok[None, :]
    at = rows[:, None] * E + cols[None, :]
    logit = tl.load(logits_ptr + at, mask=tile_ok, other=-float("inf"))
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p = tl.where(tile_ok, tl.exp(logit - lse[:, None]), 0.0)
    g = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    if HAS_AUX:
        grad_aux = tl.load(grad_aux_ptr)
        c = grad_aux * balance_scale * tl.load(load_ptr + cols, mask=col_ok, other=0.0)
        pc = tl.sum(p * c[None, :], 1)
        g += p * (c[None, :] - pc[:, None] + (grad_aux * z_scale * lse)[:, None])
    if HAS_GATES:
        if K == 1:
            idx = tl.load(expert_ptr + rows, mask=row_ok, other=0)
            gg = tl.load(grad_gates_ptr + rows, mask=row_ok, other=0.0)
            gate = tl.load(gates_ptr + rows, mask=row_ok, other=0.0)
            hit = cols[None, :] == idx[:, None]
            g += (gg * gate)[:, None] * (tl.where(hit, 1.0, 0.0) - p)
        else:
            dot = tl.zeros((BLOCK_N,), tl.float32)
            for k in tl.static_range(K):
                gg = tl.load(grad_gates_ptr + rows * K + k, mask=row_ok, other=0.0)
                dot += gg * tl.load(gates_ptr + rows * K + k, mask=row_ok, other=0.0)
            for k in tl.static_range(K):
                idx = tl.load(expert_ptr + rows * K + k, mask=row_ok, other=0)
                gg = tl.load(grad_gates_ptr + rows * K + k, mask=row_ok, other=0.0)
                gate = tl.load(gates_ptr + rows * K + k, mask=row_ok, other=0.0)
                hit = cols[None, :] == idx[:, None]
                g += tl.where(hit, (gate * (gg - dot))[:, None], 0.0)
    tl.store(grad_logits_ptr + at, g, mask=tile_ok)


class FusedRouting(torch.autograd.Function):
    """Top-k routing of float32 logits (N, E) on CUDA: three kernels forward, one backward.

    ``bias`` (E,) or None shifts the selection only (DeepSeek-V3); ``weights`` =
    (balance_loss_weight, z_loss_weight). Returns the fields of `moe.Routing` in order: the
    chosen experts (N, K) int64, their gates (N, K), the expert counts and end offsets (E,)
    int32, the slots in expert order and its inverse (N·K,) int64, the weighted aux loss, the
    load (E,), the mean entropy, the balance loss and the z-loss.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                weights: tuple[float, float]):  # fmt: skip
        N, E = logits.shape
        logits = logits.contiguous()
        expert = logits.new_empty(N, top_k, dtype=torch.int64)
        gates, lse = logits.new_empty(N, top_k), logits.new_empty(N)
        block_n, block_e = _tiles(E)
        blocks = triton.cdiv(N, block_n)
        partial = logits.new_empty(blocks, E + 2)
        block_counts, block_start = (logits.new_empty(blocks, E, dtype=torch.int32) for _ in "cs")
        _route_fwd_kernel[(blocks,)](
            logits, logits if bias is None else bias.float(), expert, gates, lse, block_counts,
            partial, N, E, K=top_k, HAS_BIAS=bias is not None, BLOCK_N=block_n,
            BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        )  # fmt: skip
        counts, offsets = (logits.new_empty(E, dtype=torch.int32) for _ in "co")
        out = logits.new_empty(E + 4)  # load (E), aux, balance, z-loss, entropy
        _route_finish_kernel[(1,)](
            partial, block_counts, block_start, counts, offsets, out, blocks, max(N, 1), E,
            max(N * top_k, 1), *weights, BLOCK_B=max(2, TILE // block_e), BLOCK_E=block_e,
        )  # fmt: skip
        order, inverse = (logits.new_empty(N * top_k, dtype=torch.int64) for _ in "oi")
        _route_place_kernel[(blocks,)](
            expert, block_start, counts, offsets, order, inverse, N, E, K=top_k,
            BLOCK_N=block_n, BLOCK_S=block_n * triton.next_power_of_2(top_k), BLOCK_E=block_e,
        )  # fmt: skip
        load, (aux, balance, z_loss, entropy) = out[:E], out[E:].unbind()
        ctx.save_for_backward(logits, lse, expert, gates, load)
        ctx.top_k, ctx.weights = top_k, weights
        outputs = (expert, gates, counts, offsets, order, inverse, aux, load, entropy, balance,
                   z_loss)  # fmt: skip
        ctx.mark_non_differentiable(*(t for t in outputs if t is not gates and t is not aux))
        ctx.set_materialize_grads(False)
        return outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, _expert, grad_gates, _counts, _offsets, _order, _inverse, grad_aux,
                 *_stats):  # fmt: skip
        logits, lse, expert, gates, load = ctx.saved_tensors
        if grad_gates is None and grad_aux is None:
            return None, None, None, None
        N, E = logits.shape
        grad_logits = torch.empty_like(logits)
        balance_weight, z_weight = ctx.weights
        block_n, block_e = _tiles(E)
        _route_bwd_kernel[(triton.cdiv(N, block_n),)](
            logits, lse, expert, gates,
            gates if grad_gates is None else grad_gates.float().contiguous(),
            lse if grad_aux is None else grad_aux.float(), load, grad_logits, N, E,
            balance_weight * E / max(N, 1), 2.0 * z_weight / max(N, 1),
            K=ctx.top_k, HAS_GATES=grad_gates is not None, HAS_AUX=grad_aux is not None,
            BLOCK_N=block_n, BLOCK_E=block_e,
        )  # fmt: skip
        return grad_logits, None, None, None
