"""Selective state-space block: Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling
with Selective State Spaces").

Per channel d and state n the block runs the diagonal SSM of eq. 2a-2b,

    h_t = Ā_t h_{t-1} + B̄_t u_t,    y_t = C_t h_t + D u_t,

discretised by zero-order hold on A and the Euler simplification on B used by the paper's code
(eq. 4):  Ā_t = exp(Δ_t A),  B̄_t ≈ Δ_t B_t.  Selectivity (Algorithm 2) makes Δ, B and C
functions of the input; with `selective=False` they are learned constants (an LTI, S4D-like
SSM with A initialised S4D-real, A_n = -(n+1)).

Training scan: `selective_scan` runs the fused C++ kernel of `selective_scan_cpu` on CPU (one
pass over time per channel block, no (B, T, E, N) tensor; ~20-40x faster than the loop), the
Triton kernels of `selective_scan_triton` on CUDA (chunked over time, states on chip), and
`selective_scan_parallel` elsewhere or when neither a compiler nor Triton is available.
The parallel scan: the recurrence h_t = a_t h_{t-1} + b_t is associative, so it is evaluated
by a log-depth odd-even (Blelloch-style) recursion over time: O(T) work, O(log T) sequential
torch ops, no Python loop over time steps, and only products of decays a_t ∈ (0, 1] are ever
formed, so nothing can overflow at any length. A custom autograd function saves only the
inputs (O(T·D)) and recomputes states in the backward, whose adjoint is the same scan run
backwards in time. Every scan can also return the state after its last step, from which
`step` decodes on after a prompt run by `SelectiveSSM.prefill`. `selective_scan_reference` is
the plain sequential loop (the semantics of mamba's `selective_scan_ref`) that tests and
benchmarks compare against.

Shape legend: B batch, T time, D model dim, E inner dim (expand·D), N state size,
R dt rank, K conv kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from advarch.models.blocks.causal_conv import causal_conv, causal_conv_step, conv_window
from advarch.models.blocks.config import BlockConfig, Checks, ModelShape
from advarch.models.blocks.selective_scan_cpu import fused_selective_scan, kernel_available
from advarch.models.blocks.triton_modules import triton_module


def _at_least_f32(t: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16/float32 tensors, float64 kept (scans never run in 16 bits)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


SSMState = tuple[torch.Tensor, torch.Tensor]  # conv window (B, K-1, E), ssm state (B, E, N)


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sequential selective scan, one time step per iteration (slow; for tests and benchmarks).

    Args:
        u: inputs (B, T, E).
        delta: positive step sizes Δ (B, T, E).
        A: negative diagonal state matrix (E, N).
        B: input matrices (B, T, N).
        C: output matrices (B, T, N).
        D: skip weights (E,).
        z: optional gate (B, T, E); the output is multiplied by SiLU(z).
        return_last_state: also return the state after the last step.

    Returns:
        y (B, T, E) in the dtype of `u`, computed in float32 (or float64 for float64 inputs);
        with `return_last_state`, (y, h_T (B, E, N)), the state `SelectiveSSM.step` carries,
        in the computation's dtype (the fast scans return it without gradient).
    """
    dtype_in = u.dtype
    u, delta, A, B, C = (_at_least_f32(t) for t in (u, delta, A, B, C))
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (B, T, E, N)
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (B, T, E, N)
    h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])  # (B, E, N)
    ys = []
    for a_t, b_t, c_t in zip(decay.unbind(1), drive.unbind(1), C.unbind(1), strict=True):
        h = a_t * h + b_t
        ys.append(torch.einsum("ben,bn->be", h, c_t))
    y = torch.stack(ys, dim=1) + u * D.to(u.dtype)
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return (y.to(dtype_in), h) if return_last_state else y.to(dtype_in)


def _linear_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All states of h_t = a_t h_{t-1} + b_t (h_{-1} = 0) along dim -2, by odd-even recursion.

    Pairs (2k, 2k+1) are combined into one step (a_{2k+1} a_{2k}, a_{2k+1} b_{2k} + b_{2k+1}),
    the half-length problem is solved recursively (giving the odd states) and the even states
    follow from their odd predecessors: log2(T) levels, total work ~2T multiply-adds.
    """
    length = a.shape[-2]
    if length == 1:
        return b
    half = length // 2
    a_even, a_odd = a[..., 0::2, :], a[..., 1::2, :]
    b_even, b_odd = b[..., 0::2, :], b[..., 1::2, :]
    h_odd = _linear_scan(
        a_odd * a_even[..., :half, :], torch.addcmul(b_odd, a_odd, b_even[..., :half, :])
    )
    h = torch.empty_like(b)
    h[..., 1::2, :] = h_odd
    h[..., 0, :] = b[..., 0, :]
    rest = (length + 1) // 2 - 1  # even positions after 0
    h[..., 2::2, :] = torch.addcmul(b_even[..., 1:, :], a_even[..., 1:, :], h_odd[..., :rest, :])
    return h


def _scan_states(u, delta, A, B) -> tuple[torch.Tensor, torch.Tensor]:
    """Decays a = exp(ΔA) and states h, both (B, N, T, E): N outermost keeps E contiguous."""
    a = torch.exp(delta.unsqueeze(1) * A.t()[None, :, None, :])  # (B, N, T, E)
    b = (delta * u).unsqueeze(1) * B.transpose(1, 2).unsqueeze(-1)  # (B, N, T, E)
    return a, _linear_scan(a, b)


class _SelectiveScanFn(torch.autograd.Function):
    """y_t = C_t · h_t with h from `_scan_states`, and the last state (B, E, N) (without
    gradient, for decoding); saves inputs only, recomputes h backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        ctx.save_for_backward(u, delta, A, B, C)
        _, h = _scan_states(u, delta, A, B)
        last = h[:, :, -1].transpose(1, 2).clone()  # (B, E, N), not a view keeping h alive
        ctx.mark_non_differentiable(last)
        return torch.einsum("bnte,btn->bte", h, C), last

    @staticmethod
    def backward(ctx, grad_y, _grad_last):
        u, delta, A, B, C = ctx.saved_tensors
        a, h = _scan_states(u, delta, A, B)
        grad_C = torch.einsum("bnte,bte->btn", h, grad_y)
        grad_h = C.transpose(1, 2).unsqueeze(-1) * grad_y.unsqueeze(1)  # (B, N, T, E)
        # adjoint: g_t = grad_h_t + a_{t+1} g_{t+1}, i.e. the same scan backwards in time
        a_next = F.pad(a[..., 1:, :], (0, 0, 0, 1)).flip(-2)
        g = _linear_scan(a_next, grad_h.flip(-2)).flip(-2)  # dL/db_t, (B, N, T, E)
        grad_du = torch.einsum("bnte,btn->bte", g, B)  # dL/d(Δu)
        grad_B = torch.einsum("bnte,bte->btn", g, delta * u)
        h_prev = F.pad(h[..., :-1, :], (0, 0, 1, 0))
        grad_log_a = g.mul_(h_prev).mul_(a)  # dL/d(Δ_t A), (B, N, T, E)
        grad_delta = grad_du * u + torch.einsum("bnte,en->bte", grad_log_a, A)
        grad_A = torch.einsum("bnte,bte->en", grad_log_a, delta)
        return grad_du * delta, grad_delta, grad_A, grad_B, grad_C


def selective_scan_parallel(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-depth parallel scan in torch ops (any device); result of `selective_scan_reference`."""
    u, delta, A, B, C = (_at_least_f32(t).contiguous() for t in (u, delta, A, B, C))
    y, last = _SelectiveScanFn.apply(u, delta, A, B, C)
    y = y + u * D.to(u.dtype)
    if z is not None:
        y = y * F.silu(z.to(u.dtype))
    return (y, last) if return_last_state else y


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan, same signature and result as `selective_scan_reference`.

    CPU tensors go to the fused C++ kernel (`selective_scan_cpu`), CUDA tensors below float64
    to the Triton kernels (`selective_scan_triton`), anything else, or a machine where neither
    is available, to `selective_scan_parallel`. Runs in float32 (float64 kept) and returns
    that dtype. The last state (`return_last_state`, for decoding) carries no gradient.
    """
    args = (delta, A, B, C, D, z, return_last_state)
    if u.device.type == "cpu" and kernel_available():
        return fused_selective_scan(_at_least_f32(u), *args)
    triton_scan = triton_module("selective_scan_triton") if u.device.type == "cuda" else None
    if triton_scan is not None and u.dtype != torch.float64:
        return triton_scan.triton_selective_scan(u, *args)
    return selective_scan_parallel(u, *args)


class SelectiveSSM(nn.Module):
    """Mamba block (Algorithm 2): gated, conv-preceded selective SSM mixing along time.

    Args:
        dim: model width D.
        d_state: SSM state size N per channel.
        d_conv: kernel size K of the causal depthwise convolution.
        expand: inner width E = expand · dim.
        dt_rank: rank R of the Δ projection (None: ceil(dim / 16), as in Mamba).
        selective: input-dependent Δ, B, C (True) or learned constants (LTI, False).
        dt_min: smallest initial Δ.
        dt_max: largest initial Δ (initial Δ is log-uniform in [dt_min, dt_max]).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        selective: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        config = SSMConfig(
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            selective=selective,
            dt_min=dt_min,
            dt_max=dt_max,
        )
        config.validate(ModelShape(dim=dim))
        dt_rank = config.rank(dim)
        inner = expand * dim
        self.d_state, self.d_conv, self.dt_rank, self.selective = (
            d_state,
            d_conv,
            dt_rank,
            selective,
        )
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        # S4D-real init A_n = -(n+1), kept as log(-A) so A stays negative
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1.0)).repeat(inner, 1))
        self.A_log._no_weight_decay = True  # decay would pull every A towards -1
        self.D = nn.Parameter(torch.ones(inner))
        # softplus^{-1} of Δ log-uniform in [dt_min, dt_max] (Mamba's dt bias init)
        dt = torch.exp(torch.empty(inner).uniform_(math.log(dt_min), math.log(dt_max)))
        dt_bias = dt + torch.log(-torch.expm1(-dt))
        if selective:
            self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
            self.dt_proj = nn.Linear(dt_rank, inner)
            nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
            with torch.no_grad():
                self.dt_proj.bias.copy_(dt_bias)
            self.dt_proj.keeps_init = True  # a model's own init must not reset the time scales
        else:
            self.dt_bias = nn.Parameter(dt_bias)
            self.B = nn.Parameter(torch.ones(d_state))
            self.C = nn.Parameter(torch.randn(d_state) * d_state**-0.5)

    def _ssm_params(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Δ (…, E), B (…, N), C (…, N) for activations u (…, E)."""
        if not self.selective:
            shape = u.shape[:-1]
            delta = F.softplus(self.dt_bias).expand(*shape, -1)
            return delta, self.B.expand(*shape, -1), self.C.expand(*shape, -1)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(_at_least_f32(self.dt_proj(dt))), B, C

    def forward(
        self,
        x: torch.Tensor,
        *,
        pad_mask: torch.Tensor | None = None,
        global_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mix x (B, T, D) causally along time.

        Args:
            x: inputs (B, T, D).
            pad_mask: (B, T) bool, True at padding. Padded inputs and their SSM drive are zeroed,
                so leading (left) padding leaves real tokens exactly as without it; trailing
                (right) padding, the norm for causal models, cannot reach earlier tokens anyway.
            global_mask: unused; part of the mixer call contract (`advarch.models.layers.Mixer`):
                a recurrence has no window for global tokens to reach beyond.

        Returns:
            (B, T, D).
        """
        if pad_mask is not None:
            x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        return self._mix(x, pad_mask)[0]

    def _mix(
        self, x: torch.Tensor, pad_mask: torch.Tensor | None, last_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """in_proj → causal conv + SiLU → scan → out_proj over x (B, T, D).

        Returns the output (B, T, D), the conv's inputs (B, T, E) and, with `last_state`, the
        scan's state after the last step (B, E, N) (else None).
        """
        u_in, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        u = F.silu(causal_conv(self.conv, u_in))
        if pad_mask is not None:
            u = u.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        delta, B, C = self._ssm_params(u)
        A = -torch.exp(_at_least_f32(self.A_log))  # (E, N)
        with torch.autocast(x.device.type, enabled=False):  # the scan always runs in float32
            out = selective_scan(u, delta, A, B, C, self.D, z, return_last_state=last_state)
        y, h = out if last_state else (out, None)
        return self.out_proj(y.to(x.dtype)), u_in, h

    def init_state(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> SSMState:
        """Zero conv window (B, K-1, E) in `dtype` and zero SSM state (B, E, N) in float32."""
        inner = self.D.shape[0]
        conv = torch.zeros(batch_size, self.d_conv - 1, inner, device=device, dtype=dtype)
        return conv, torch.zeros(batch_size, inner, self.d_state, device=device)

    def step(self, x: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """One token x (B, 1, D) → (B, 1, D) and the next state, in O(1) time and memory."""
        conv_state, h = state
        u, z = self.in_proj(x).chunk(2, dim=-1)  # (B, 1, E)
        window = torch.cat([conv_state, u], dim=1)  # (B, K, E)
        u = F.silu(causal_conv_step(self.conv, window))  # (B, 1, E)
        delta, B, C = (_at_least_f32(t.squeeze(1)) for t in self._ssm_params(u))
        u, z = _at_least_f32(u.squeeze(1)), _at_least_f32(z.squeeze(1))
        A = -torch.exp(_at_least_f32(self.A_log))
        h = torch.exp(delta.unsqueeze(-1) * A) * h + (delta * u).unsqueeze(-1) * B.unsqueeze(1)
        y = (torch.einsum("ben,bn->be", h, C) + self.D * u) * F.silu(z)  # (B, E)
        return self.out_proj(y.unsqueeze(1).to(x.dtype)), (window[:, 1:], h)

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, SSMState]:
        """A prompt x (B, T, D) through the fast scan → (B, T, D) and the state after it: the
        last K−1 conv inputs and the scan's final h, what T calls of `step` would leave."""
        y, u_in, h = self._mix(x, None, last_state=True)
        return y, (conv_window(u_in, self.d_conv), h)


@dataclass(frozen=True)
class SSMConfig(BlockConfig):
    """`model.ssm`: selective SSM options (see `SelectiveSSM`)."""

    name: ClassVar[str] = "ssm"

    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None
    selective: bool = True
    dt_min: float = 1e-3
    dt_max: float = 0.1

    def rank(self, dim: int) -> int:
        """The Δ projection rank: `dt_rank`, or ceil(dim / 16) as in Mamba."""
        return math.ceil(dim / 16) if self.dt_rank is None else self.dt_rank

    def checks(self, shape: ModelShape) -> Checks:
        yield from self.at_least_one(*("d_state", "d_conv", "expand"))
        rank = self.rank(shape.dim)
        yield rank >= 1, f"{self.key('dt_rank')}={rank} must be >= 1"
        yield self.ordered("dt_min", "dt_max")

    def build(self, shape: ModelShape, causal: bool = True) -> SelectiveSSM:
        """The SSM mixer of a layer of `shape` (always causal: it is a recurrence)."""
        return SelectiveSSM(shape.dim, **self.options())
