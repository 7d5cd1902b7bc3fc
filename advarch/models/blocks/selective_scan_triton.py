"""Fused selective scan for GPUs in Triton: forward and backward, chunked over time.

The recurrence of `ssm.selective_scan_reference`, per batch b, channel e and state n,

    h_t = a_t h_{t-1} + b_t,   a_t = exp(Δ_t A),   b_t = Δ_t u_t B_t,   y_t = Σ_n C_t h_t,

runs as one program per (batch, block of channels). Each program walks time in chunks of
``CHUNK`` steps: it loads the chunk's inputs as (CHUNK, BLOCK_E) tiles, forms a and b as
(CHUNK, BLOCK_E, N) tiles on chip, combines them with `tl.associative_scan` (the operator
(a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂)), adds the carried state times the cumulative decay,
and writes y. States stay in registers in float32; inputs may be bf16 or float32. Nothing of
size (B, T, E, N) ever touches memory: the forward saves only the state at each chunk start,
(B, T / CHUNK, E, N), and, for decoding, the state after the last step (B, E, N).

The backward visits the chunks last to first. It recomputes the chunk's states from the saved
chunk-start state, runs the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} as a reverse associative
scan with the carry from the later chunk, and forms every gradient from h and g on chip:
dΔu = Σ_n g B, dB = Σ_e g Δu, dC = Σ_e h dy, d log a = g (h_t − b_t) (= g a_t h_{t−1}),
dΔ = dΔu · u + Σ_n d log a · A, dA = Σ_t d log a · Δ. dB and dC sum over channel blocks with
atomic adds; dA is summed over time in the program and over batches by torch.

Addresses are a chunk's base, an int64 scalar (the saved chunk-start states alone have
B·T·E·N / CHUNK elements, past 2³¹ at B 64 of the bench size), plus int32 offsets within the
chunk, the same every chunk.

Shapes: B batch, T time, E channels, N state size (padded to a power of two on chip).
Import only where Triton is installed; tests run it on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles: the fastest of bench --device cuda's sweep on an H200 (B 8, T 8192, E 2048, N 16,
# fwd+bwd 22.3 ms; 16 / 32 / 8 warps 33.5 ms); ptxas: 128 / 255 registers, no spills.
CHUNK, BLOCK_E, NUM_WARPS = 8, 16, 2


@triton.jit
def _combine(a1, b1, a2, b2):
    """(a₁, b₁) then (a₂, b₂): h ↦ a₂(a₁h + b₁) + b₂."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _chunk_states(u, dt, A, Bt, h0):
    """States (CHUNK, BE, BN) of one chunk from its start state h0 (BE, BN), and its drive b."""
    a = tl.exp(dt[:, :, None] * A[None, :, :])
    b = (dt * u)[:, :, None] * Bt[:, None, :]
    acum, h = tl.associative_scan((a, b), 0, _combine)
    return h + acum * h0[None, :, :], b


@triton.jit
def _fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, y_ptr, hs_ptr, last_ptr,
    T, E, N, n_chunks,
    SAVE: tl.constexpr, LAST: tl.constexpr, CHUNK: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_b, pid_e = tl.program_id(0), tl.program_id(1)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, CHUNK)
    en_ok = (e < E)[:, None] & (n < N)[None, :]
    en = e[:, None] * N + n[None, :]  # offsets within a (E, N) state
    te, tn = rows[:, None] * E + e[None, :], rows[:, None] * N + n[None, :]  # within a chunk
    A = tl.load(A_ptr + en, mask=en_ok, other=0.0)
    h = tl.zeros((BLOCK_E, BLOCK_N), tl.float32)
    for c in range(n_chunks):
        t = c * CHUNK + rows
        te_ok = (t < T)[:, None] & (e < E)[None, :]
        tn_ok = (t < T)[:, None] & (n < N)[None, :]
        row = pid_b.to(tl.int64) * T + c * CHUNK  # the chunk's first row of (B·T, ·)
        u = tl.load(u_ptr + row * E + te, mask=te_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row * E + te, mask=te_ok, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + row * N + tn, mask=tn_ok, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + row * N + tn, mask=tn_ok, other=0.0).to(tl.float32)
        if SAVE:
            start = (pid_b * n_chunks + c).to(tl.int64) * E * N  # of the chunk-start state
            tl.store(hs_ptr + start + en, h, mask=en_ok)
        hc, _ = _chunk_states(u, dt, A, Bt, h)
        tl.store(y_ptr + row * E + te, tl.sum(hc * Ct[:, None, :], axis=2), mask=te_ok)
        h = tl.sum(tl.where((rows == CHUNK - 1)[:, None, None], hc, 0.0), axis=0)  # padded
        # rows past T have a = 1, b = 0, so the last row is the state at min(end, T − 1)
    if LAST:
        tl.store(last_ptr + pid_b.to(tl.int64) * E * N + en, h, mask=en_ok)


@triton.jit
def _bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, dy_ptr, hs_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr,
    T, E, N, n_chunks,
    CHUNK: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_b, pid_e = tl.program_id(0), tl.program_id(1)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    n = tl.arange(0, BLOCK_N)
    rows = tl.arange(0, CHUNK)
    en_ok = (e < E)[:, None] & (n < N)[None, :]
    en = e[:, None] * N + n[None, :]  # offsets within a (E, N) state
    te, tn = rows[:, None] * E + e[None, :], rows[:, None] * N + n[None, :]  # within a chunk
    A = tl.load(A_ptr + en, mask=en_ok, other=0.0)
    g_next = tl.zeros((BLOCK_E, BLOCK_N), tl.float32)  # g at the first step of the later chunk
    dA = tl.zeros((BLOCK_E, BLOCK_N), tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        t = c * CHUNK + rows
        te_ok = (t < T)[:, None] & (e < E)[None, :]
        tn_ok = (t < T)[:, None] & (n < N)[None, :]
        row = pid_b.to(tl.int64) * T + c * CHUNK  # the chunk's first row of (B·T, ·)
        u = tl.load(u_ptr + row * E + te, mask=te_ok, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + row * E + te, mask=te_ok, other=0.0).to(tl.float32)
        next_ok = (t + 1 < T)[:, None] & (e < E)[None, :]
        dt_next = tl.load(dt_ptr + (row + 1) * E + te, mask=next_ok, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + row * N + tn, mask=tn_ok, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + row * N + tn, mask=tn_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * E + te, mask=te_ok, other=0.0).to(tl.float32)
        start = (pid_b * n_chunks + c).to(tl.int64) * E * N  # of the chunk-start state
        h0 = tl.load(hs_ptr + start + en, mask=en_ok, other=0.0)
        h, b = _chunk_states(u, dt, A, Bt, h0)
        # adjoint, last step first: g_t = C_t dy_t + a_{t+1} g_{t+1}
        a_next = tl.exp(dt_next[:, :, None] * A[None, :, :])
        gh = dy[:, :, None] * Ct[:, None, :]
        pcum, g = tl.associative_scan((a_next, gh), 0, _combine, reverse=True)
        g = g + pcum * g_next[None, :, :]
        g_next = tl.sum(tl.where((rows == 0)[:, None, None], g, 0.0), axis=0)
        d_du = tl.sum(g * Bt[:, None, :], axis=2)  # dL/d(Δu), (CHUNK, BE)
        dlog_a = g * (h - b)  # dL/d(ΔA) = g_t a_t h_{t−1}
        ddt = d_du * u + tl.sum(dlog_a * A[None, :, :], axis=2)
        tl.store(du_ptr + row * E + te, d_du * dt, mask=te_ok)
        tl.store(ddt_ptr + row * E + te, ddt, mask=te_ok)
        dA += tl.sum(dlog_a * dt[:, :, None], axis=0)
        tl.atomic_add(dB_ptr + row * N + tn, tl.sum(g * (dt * u)[:, :, None], axis=1), mask=tn_ok)
        tl.atomic_add(dC_ptr + row * N + tn, tl.sum(h * dy[:, :, None], axis=1), mask=tn_ok)
    tl.store(dA_ptr + pid_b.to(tl.int64) * E * N + en, dA, mask=en_ok)


def _launch_shape(u: torch.Tensor, A: torch.Tensor) -> tuple[tuple[int, int], int, int]:
    """Grid, chunks and the padded state size."""
    Bsz, T, E = u.shape
    grid = (Bsz, triton.cdiv(E, BLOCK_E))
    return grid, triton.cdiv(T, CHUNK), triton.next_power_of_2(A.shape[1])


class _TritonScanFn(torch.autograd.Function):
    """y_t = C_t · h_t and the last state (B, E, N) (with `last`; no gradient); saves inputs
    and chunk-start states, recomputes the rest backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, last):
        Bsz, T, E = u.shape
        N = A.shape[1]
        grid, n_chunks, block_n = _launch_shape(u, A)
        save = torch.is_grad_enabled() or any(ctx.needs_input_grad)
        y = torch.empty(Bsz, T, E, device=u.device, dtype=torch.float32)
        hs = torch.empty(Bsz, n_chunks if save else 1, E, N, device=u.device, dtype=torch.float32)
        h_last = torch.zeros(Bsz, E, N, device=u.device, dtype=torch.float32) if last else hs
        _fwd_kernel[grid](
            u, delta, A, B, C, y, hs, h_last, T, E, N, n_chunks,
            SAVE=save, LAST=last, CHUNK=CHUNK, BLOCK_E=BLOCK_E, BLOCK_N=block_n,
            num_warps=NUM_WARPS,
        )  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, hs)
        ctx.mark_non_differentiable(h_last)
        return y, h_last

    @staticmethod
    def backward(ctx, dy, _d_last):
        u, delta, A, B, C, hs = ctx.saved_tensors
        Bsz, T, E = u.shape
        N = A.shape[1]
        grid, n_chunks, block_n = _launch_shape(u, A)
        du = torch.empty(Bsz, T, E, device=u.device, dtype=torch.float32)
        ddelta = torch.empty_like(du)
        dA = torch.empty(Bsz, E, N, device=u.device, dtype=torch.float32)
        dB = torch.zeros(Bsz, T, N, device=u.device, dtype=torch.float32)
        dC = torch.zeros_like(dB)
        _bwd_kernel[grid](
            u, delta, A, B, C, dy.contiguous(), hs, du, ddelta, dA, dB, dC, T, E, N, n_chunks,
            CHUNK=CHUNK, BLOCK_E=BLOCK_E, BLOCK_N=block_n, num_warps=NUM_WARPS,
        )  # fmt: skip
        grads = (du, ddelta, dA.sum(0), dB, dC)
        return *(g.to(x.dtype) for g, x in zip(grads, (u, delta, A, B, C), strict=True)), None


def triton_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`selective_scan_reference` through the Triton kernels; y (and the last state) in
    float32 (inputs any float)."""
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    y, last = _TritonScanFn.apply(u, delta, A.float().contiguous(), B, C, return_last_state)
    y = y + u.float() * D.float()
    y = y if z is None else y * torch.nn.functional.silu(z.float())
    return (y, last) if return_last_state else y
