"""Mamba-2 block: the SSD mixer (Dao & Gu 2024, "Transformers are SSMs", §6–7 and Listing 1).

Per head h, with a scalar decay a_h = −exp(A_log_h) < 0, head dim P and a state of N columns
shared by all heads (one group):

    H_t = exp(Δ_t a_h) H_{t−1} + Δ_t x_t B_tᵀ   (P × N),      y_t = H_t C_t + D_h x_t.

Training runs the chunked SSD algorithm (`ssd_chunked`): time is cut into chunks of L steps;
inside a chunk the output is the masked, decayed "attention" (L ∘ C Bᵀ) · X; the states at
chunk ends pass through a recurrence over the T / L chunks, itself one matmul with the
segment-sum decay matrix; the carried states then add C · H to every output. Everything is a
matmul (tensor cores on GPUs, BLAS on CPUs), work O(T·L), no Python loop over time.
`ssd_reference` is the sequential loop the tests compare it with.

The block (Mamba-2 §7): in_proj → z, x, B, C, Δ; causal depthwise conv + SiLU on (x, B, C);
Δ = softplus(Δ + bias); SSD; y ← RMSNorm(y · SiLU(z)); out_proj. `step` decodes one token in
O(1) time and memory from (conv window, state); `prefill` gives that state after a whole prompt
from the chunked pass (its final chunk-recurrence state, the prompt's last conv inputs).

Shapes: B batch, T time, D model dim, E inner dim (expand·D), H heads (E / P), P head dim,
N state size, L chunk length, c number of chunks, K conv width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advarch.models.blocks.causal_conv import causal_conv, causal_conv_step, conv_window
from advarch.models.blocks.config import BlockConfig, Checks, ModelShape
from advarch.models.blocks.norm import RMSNorm
from advarch.models.blocks.ssm import _at_least_f32

SSDState = tuple[Tensor, Tensor]  # conv window (B, K−1, E + 2N), state (B, H, P, N) float32


def _segsum(a: Tensor) -> Tensor:
    """(…, L) → (…, L, L): a_{j+1} + … + a_i at [i, j] for j ≤ i, −inf above the diagonal.

    Masked cumulative sums (not differences of one cumsum), so no cancellation at any length.
    """
    L = a.shape[-1]
    ones = torch.ones(L, L, dtype=torch.bool, device=a.device)
    sums = a.unsqueeze(-1).expand(*a.shape, L).masked_fill(~ones.tril(-1), 0).cumsum(-2)
    return sums.masked_fill(~ones.tril(), float("-inf"))


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Chunked SSD. x (B, T, H, P), dt (B, T, H) > 0, A (H,) < 0, B and C (B, T, N).

    Returns y (B, T, H, P) (without the D skip) and the final state (B, H, P, N). Decays are
    formed in float32; the matmuls follow autocast.
    """
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    pad = -T % chunk  # steps with Δ = 0 decay nothing and add nothing
    if pad:
        x, dt = F.pad(x, (0, 0, 0, 0, 0, pad)), F.pad(dt, (0, 0, 0, pad))
        B, C = F.pad(B, (0, 0, 0, pad)), F.pad(C, (0, 0, 0, pad))
    c = x.shape[1] // chunk
    X = (x * dt.unsqueeze(-1).to(x.dtype)).view(Bsz, c, chunk, H, P)
    a = (_at_least_f32(dt) * _at_least_f32(A)).view(Bsz, c, chunk, H).permute(0, 3, 1, 2)
    a_cum = a.cumsum(-1)
    Bc, Cc = B.view(Bsz, c, chunk, N), C.view(Bsz, c, chunk, N)
    # 1. within each chunk: (L ∘ C Bᵀ) X
    scores = torch.einsum("bcln,bcsn->bcls", Cc, Bc)  # (B, c, L, L)
    weights = scores.unsqueeze(1) * torch.exp(_segsum(a)).to(scores.dtype)  # (B, H, c, L, L)
    y = torch.einsum("bhcls,bcshp->bclhp", weights, X)
    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum).to(X.dtype)  # (B, H, c, L)
    states = torch.einsum("bcln,bhcl,bclhp->bchpn", Bc, to_end, X)  # (B, c, H, P, N)
    # 3. states at every chunk start: a recurrence over chunks, as one decay-matrix product
    if initial_state is None:
        initial_state = states.new_zeros(Bsz, H, P, N)
    states = torch.cat([initial_state.unsqueeze(1).to(states.dtype), states], dim=1)
    across = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0)))).to(states.dtype)  # (B,H,c+1,c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", across, states)  # (B, c + 1, H, P, N)
    # 4. the carried-in state's share of every output
    from_start = torch.exp(a_cum).to(states.dtype)  # (B, H, c, L)
    y = y + torch.einsum("bcln,bchpn,bhcl->bclhp", Cc, states[:, :-1], from_start)
    return y.reshape(Bsz, c * chunk, H, P)[:, :T], states[:, -1]


def ssd_reference(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time (slow; ground truth for tests). Same I/O as above."""
    Bsz, T, H, P = x.shape
    h = x.new_zeros(Bsz, H, P, B.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]  # (B, H, 1, 1)
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
    return torch.stack(ys, dim=1), h


class Mamba2(nn.Module):
    """Mamba-2 mixer (SSD), usable in any layer pattern as `ssd`.

    Args:
        dim: model width D.
        d_state: state size N (Mamba-2 uses 64–128, far more than Mamba's 16).
        d_conv: causal depthwise convolution width K.
        expand: inner width E = expand · dim.
        head_dim: P; must divide E (H = E / P heads, one scalar decay each).
        chunk_size: L of the chunked algorithm (speed only, not semantics).
        dt_min: smallest initial Δ.
        dt_max: largest initial Δ (log-uniform in between).
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        head_dim: int = 64,
        chunk_size: int = 64,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
    ) -> None:
        super().__init__()
        config = SSDConfig(
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            head_dim=head_dim,
            chunk_size=chunk_size,
            dt_min=dt_min,
            dt_max=dt_max,
        )
        config.validate(ModelShape(dim=dim))
        inner = expand * dim
        self.inner, self.d_state, self.head_dim = inner, d_state, head_dim
        self.heads, self.chunk_size, self.d_conv = inner // head_dim, chunk_size, d_conv
        conv_dim = inner + 2 * d_state
        self.in_proj = nn.Linear(dim, inner + conv_dim + self.heads, bias=False)
        self.conv = nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1)
        dt = torch.exp(torch.empty(self.heads).uniform_(math.log(dt_min), math.log(dt_max)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(Δ)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1.0, 16.0)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = RMSNorm(inner)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """in_proj(x) → z (…, E), conv input (…, E + 2N), Δ before softplus (…, H)."""
        return self.in_proj(x).split([self.inner, self.inner + 2 * self.d_state, self.heads], -1)

    def _ssd_inputs(self, xbc: Tensor, dt: Tensor) -> tuple[Tensor, ...]:
        """Conv output (…, E + 2N) and raw Δ → x (…, H, P), Δ (…, H) float32, A, B, C."""
        xs, B, C = xbc.split([self.inner, self.d_state, self.d_state], -1)
        delta = F.softplus(_at_least_f32(dt) + _at_least_f32(self.dt_bias))
        A = -torch.exp(_at_least_f32(self.A_log))
        return xs.unflatten(-1, (self.heads, self.head_dim)), delta, A, B, C

    def _out(self, y: Tensor, xs: Tensor, z: Tensor) -> Tensor:
        """SSD output (…, H, P) + D skip → gated RMSNorm → out_proj."""
        y = (y + xs * self.D.to(xs.dtype)[:, None]).flatten(-2)
        return self.out_proj(self.norm(y * F.silu(z.to(y.dtype))).to(z.dtype))

    def forward(
        self, x: Tensor, *, pad_mask: Tensor | None = None, global_mask: Tensor | None = None
    ) -> Tensor:
        """Mix x (B, T, D) causally; padded positions are zeroed in and carry nothing.

        `global_mask` (the mixer call contract, `advarch.models.layers.Mixer`) is unused: a
        recurrence has no window for global tokens to reach beyond.
        """
        if pad_mask is not None:
            x = x.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        return self._mix(x, pad_mask)[0]

    def _mix(self, x: Tensor, pad_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """in_proj → causal conv + SiLU → chunked SSD → gated norm → out_proj over x (B, T, D).

        Returns the output (B, T, D), the conv's inputs (B, T, E + 2N) and the SSD state after
        the last step (B, H, P, N).
        """
        z, xbc_in, dt = self._split(x)
        xbc = F.silu(causal_conv(self.conv, xbc_in))
        if pad_mask is not None:
            xbc = xbc.masked_fill(pad_mask.unsqueeze(-1), 0.0)
        xs, delta, A, B, C = self._ssd_inputs(xbc, dt)
        y, h = ssd_chunked(xs, delta, A, B, C, self.chunk_size)
        return self._out(y, xs, z), xbc_in, h

    def init_state(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype
    ) -> SSDState:
        """Zero conv window (B, K−1, E + 2N) in ``dtype``, zero state (B, H, P, N) in float32
        (float64 for float64 models)."""
        conv = torch.zeros(batch_size, self.d_conv - 1, self.conv.in_channels, device=device,
                           dtype=dtype)  # fmt: skip
        shape = (batch_size, self.heads, self.head_dim, self.d_state)
        return conv, torch.zeros(
            shape, device=device, dtype=torch.promote_types(dtype, torch.float32)
        )

    def step(self, x: Tensor, state: SSDState) -> tuple[Tensor, SSDState]:
        """One token x (B, 1, D) → (B, 1, D) and the next state, O(1) in the sequence length."""
        conv_state, h = state
        z, xbc, dt = self._split(x)
        window = torch.cat([conv_state, xbc], dim=1)  # (B, K, E + 2N)
        xbc = F.silu(causal_conv_step(self.conv, window))
        xs, delta, A, B, C = self._ssd_inputs(xbc, dt)  # xs (B, 1, H, P), delta (B, 1, H)
        xs32, delta = _at_least_f32(xs[:, 0]), delta[:, 0]
        B, C = _at_least_f32(B[:, 0]), _at_least_f32(C[:, 0])
        drive = (delta[..., None] * xs32)[..., None] * B[:, None, None, :]  # (B, H, P, N)
        h = torch.exp(delta * A)[..., None, None] * h + drive
        y = torch.einsum("bhpn,bn->bhp", h, C)[:, None].to(xs.dtype)  # (B, 1, H, P)
        return self._out(y, xs, z), (window[:, 1:], h)

    def prefill(self, x: Tensor) -> tuple[Tensor, SSDState]:
        """A prompt x (B, T, D) through the chunked SSD → (B, T, D) and the state after it: the
        last K−1 conv inputs and the final state of the chunk recurrence (in `init_state`'s
        dtype), what T calls of `step` would leave."""
        y, xbc_in, h = self._mix(x, None)
        state_dtype = torch.promote_types(x.dtype, torch.float32)
        return y, (conv_window(xbc_in, self.d_conv), h.to(state_dtype))


@dataclass(frozen=True)
class SSDConfig(BlockConfig):
    """`model.ssd`: Mamba-2 SSD options (see `Mamba2`)."""

    name: ClassVar[str] = "ssd"

    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    head_dim: int = 64
    chunk_size: int = 64
    dt_min: float = 1e-3
    dt_max: float = 0.1

    def checks(self, shape: ModelShape) -> Checks:
        yield from self.at_least_one(*("d_state", "d_conv", "expand", "head_dim", "chunk_size"))
        inner = self.expand * shape.dim
        yield (
            inner % self.head_dim == 0,
            f"{self.key('head_dim')}={self.head_dim} must divide "
            f"{self.key('expand')} · model.dim = {inner}",
        )
        yield self.ordered("dt_min", "dt_max")

    def build(self, shape: ModelShape, causal: bool = True) -> Mamba2:
        """The SSD mixer of a layer of `shape` (always causal: it is a recurrence)."""
        return Mamba2(shape.dim, **self.options())
