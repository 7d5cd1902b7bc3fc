"""Running MoE experts on token rows grouped by expert: grouped matmul or a loop, and the
accelerators' dropless dispatch as one autograd node.

Rows are sorted by expert, so expert e owns one contiguous block. `Groups` says where the
blocks are: end offsets on the device (int32, for `grouped_mm`, never read by the host) or
row counts on the host (for the loop of E dense matmuls that CPU and exotic dtypes use).

`DroplessExperts` is the whole dropless path on the grouped matmul: gather the token-slots
into expert order, run the experts, gather back and mix by the gates. On accelerators the MoE
block is bound by per-op host overhead (issue 14: its forward + backward took as long at 512
tokens as at 16,384), so that path is one autograd node with a written-out backward: the
block's output has 8 autograd nodes where autograd's composition of the same ops has 21 (GELU)
/ 23 (SwiGLU), and a bf16 forward + backward dispatches 94 / 100 aten ops instead of 111 /
116. Tokens move by gathers both ways (no scatter, no atomics). The loop path stays autograd's
composition (`expert_mlp`): on CPU it is as fast, and it is the node's plain reference.

Shapes: N tokens, K experts per token, S = N·K slots, D model dim, E experts, H the experts'
first-layer width (2·hidden for SwiGLU's fused gate and up projections).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_PROBED: dict[tuple[torch.dtype, str], bool] = {}

Groups = torch.Tensor | list[int]  # int32 end offsets (grouped matmul) or row counts (loop)


@torch.compiler.assume_constant_result
def grouped_mm_supported(dtype: torch.dtype, device_type: str) -> bool:
    """Whether the grouped matmul exists and gives correct values and gradients here.

    Probed once per (dtype, device type): torch's kernel covers only some devices and dtypes
    (float64 is rejected on CPU, CUDA needs SM ≥ 80), so MoE falls back to a loop over experts.
    Under torch.compile the answer is a constant of the graph (the probe runs eagerly; a
    `functools.cache` wrapper would be traced through, probe included).
    """
    key = (dtype, device_type)
    if key not in _GROUPED_MM_PROBED:
        _GROUPED_MM_PROBED[key] = _probe_grouped_mm(dtype, device_type)
    return _GROUPED_MM_PROBED[key]


def _probe_grouped_mm(dtype: torch.dtype, device_type: str) -> bool:
    """One small grouped matmul, forward and backward, against the per-group matmuls."""
    if _GROUPED_MM is None:
        return False
    try:
        with torch.autocast(device_type, enabled=False), torch.enable_grad():
            # fixed values, not randn: probing must not advance the global RNG
            grid = functools.partial(torch.linspace, -1.0, 1.0, dtype=dtype, device=device_type)
            a = grid(48).reshape(6, 8).requires_grad_(True)
            b = grid(128).reshape(2, 8, 8).flip(-1).requires_grad_(True)
            offs = torch.tensor([2, 6], dtype=torch.int32, device=device_type)
            out = _GROUPED_MM(a, b, offs=offs)
            ref = torch.cat([a[:2] @ b[0], a[2:] @ b[1]])
            g = grid(48).reshape(6, 8).cos()  # a dense upstream gradient, as in the MoE forward
            grads = torch.autograd.grad(out, (a, b), g)
            ref_grads = torch.autograd.grad(ref, (a, b), g)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    pairs = [(out, ref), *zip(grads, ref_grads, strict=True)]
    return all(torch.allclose(u.float(), v.float(), rtol=2e-2, atol=2e-2) for u, v in pairs)


def grouped_mm_runs(dtype: torch.dtype, device_type: str, widths: tuple[int, ...],
                    weights: tuple[torch.Tensor, ...]) -> bool:  # fmt: skip
    """Whether the grouped matmul can take rows of these widths and these expert weights.

    The kernel needs 16-byte aligned rows (every width) and weights with a unit last stride
    and aligned rows and start. Under torch.compile only bfloat16 is traced (the kernel's
    meta function accepts nothing else) and the weights' start is not checked: the pointer is
    unknown while tracing, and the weights reaching the kernel there are parameters or casts,
    which are allocated aligned.
    """
    if not grouped_mm_supported(dtype, device_type):
        return False
    compiling = torch.compiler.is_compiling()
    if compiling and dtype != torch.bfloat16:
        return False
    size = dtype.itemsize
    if any(w * size % 16 for w in widths):
        return False
    for t in weights:
        rows_ok = all(s * size % 16 == 0 for s in t.stride()[:-1])
        if t.stride(-1) != 1 or not rows_ok or not (compiling or t.data_ptr() % 16 == 0):
            return False
    return True


def expert_groups(counts: torch.Tensor, grouped: bool) -> Groups:
    """The row blocks of (E,) per-expert counts: device end offsets, or host counts."""
    return counts.cumsum(0, dtype=torch.int32) if grouped else counts.tolist()


def expert_mlp(xs: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, groups: Groups,
               activation: str) -> torch.Tensor:  # fmt: skip
    """Expert e's MLP on its block of rows xs (S, D) → (S, D), recorded by autograd; the
    stacked weights are cast to xs's dtype."""
    w_in, w_out = w_in.to(xs.dtype), w_out.to(xs.dtype)
    if isinstance(groups, torch.Tensor):
        return _GROUPED_MM(activate(_GROUPED_MM(xs, w_in, offs=groups), activation), w_out,
                           offs=groups)  # fmt: skip
    # unbind, not w_in[e]: each indexing op would backprop a full (E, …) zero gradient
    blocks = zip(xs.split(groups), w_in.unbind(0), w_out.unbind(0), strict=True)
    return torch.cat([activate(b @ wi, activation) @ wo for b, wi, wo in blocks])


def activate(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU, or SwiGLU on fused (gate ‖ up) columns: silu(gate) · up."""
    return activate_saving(pre, activation)[0]


def activate_saving(pre: torch.Tensor, activation: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`activate`, and what `activate_backward` needs besides pre (SwiGLU: silu(gate))."""
    if activation == "swiglu":
        gate, up = pre.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        return silu_gate * up, [silu_gate]
    return F.gelu(pre), []


def activate_backward(grad: torch.Tensor, pre: torch.Tensor, activation: str,
                      saved: list[torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """The gradient of `activate` at `pre` for the upstream gradient `grad`."""
    if activation == "swiglu":
        gate, up = pre.chunk(2, dim=-1)
        g_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return torch.cat([g_gate, grad * saved[0]], dim=-1)
    return torch.ops.aten.gelu_backward(grad, pre)


class _MLPGrads(NamedTuple):
    """Gradients of the experts' MLP (None where not asked for)."""

    xs: torch.Tensor | None
    w_in: torch.Tensor | None
    w_out: torch.Tensor | None


def _mlp_grouped(xs: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, offs: torch.Tensor,
                 activation: str) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
    """Every expert's MLP as two grouped matmuls: ([pre-activation (S, H), activation, what
    the activation's backward needs], output (S, D))."""
    pre = _GROUPED_MM(xs, w_in, offs=offs)
    h, saved = activate_saving(pre, activation)
    return [pre, h, *saved], _GROUPED_MM(h, w_out, offs=offs)


def _mlp_grouped_backward(grad_out: torch.Tensor, xs: torch.Tensor, kept: list[torch.Tensor],
                          w_in: torch.Tensor, w_out: torch.Tensor, offs: torch.Tensor,
                          activation: str, need: tuple[bool, bool, bool]) -> _MLPGrads:  # fmt: skip
    """Gradients of `_mlp_grouped` for grad_out (S, D)."""
    need_x, need_w_in, need_w_out = need
    pre, h, *saved = kept
    grad_w_out = _GROUPED_MM(h.t(), grad_out, offs=offs) if need_w_out else None
    if not (need_x or need_w_in):
        return _MLPGrads(None, None, grad_w_out)
    grad_h = _GROUPED_MM(grad_out, w_out.transpose(1, 2), offs=offs)
    grad_pre = activate_backward(grad_h, pre, activation, saved)
    grad_xs = _GROUPED_MM(grad_pre, w_in.transpose(1, 2), offs=offs) if need_x else None
    grad_w_in = _GROUPED_MM(xs.t(), grad_pre, offs=offs) if need_w_in else None
    return _MLPGrads(grad_xs, grad_w_in, grad_w_out)


class DroplessExperts(torch.autograd.Function):
    """y[n] = Σ_k gates[n, k] · expert_{e(n, k)}(x[n]) for every token n, the experts run as
    grouped matmuls: one autograd node.

    Slot n·K + k is token n's k-th choice; `order` lists the slots sorted by expert, `inverse`
    is its inverse permutation and `offs` (E,) int32 the end row of each expert's block.
    Inputs: x (N, D) in the compute dtype, gates (N, K), the stacked weights w_in (E, D, H),
    w_out (E, H/m, D) in any dtype (cast to x's here; their gradients come back in theirs);
    `keep`: whether a backward will follow (grad mode on). The backward skips the gradients
    nobody asked for (frozen experts, a frozen input).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gates: torch.Tensor, w_in: torch.Tensor,
                w_out: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                offs: torch.Tensor, activation: str, keep: bool) -> torch.Tensor:  # fmt: skip
        N, K = gates.shape
        w_in_c, w_out_c = w_in.to(x.dtype), w_out.to(x.dtype)
        xs = x.index_select(0, order // K)  # (S, D) in expert order
        kept, out = _mlp_grouped(xs, w_in_c, w_out_c, offs, activation)  # kept: pre, h, …
        per_token = out.index_select(0, inverse).view(N, K, x.shape[1])  # (N, K, D) token order
        gates_c = gates.unsqueeze(-1).to(x.dtype)  # (N, K, 1)
        y = (per_token * gates_c).sum(1)  # (N, D)
        if keep:
            saved = (xs, per_token, gates_c, w_in_c, w_out_c, order, inverse, offs, *kept)
            ctx.save_for_backward(*saved)
            ctx.activation, ctx.dtypes = activation, (gates.dtype, w_in.dtype, w_out.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        xs, per_token, gates_c, w_in_c, w_out_c, order, inverse, offs, *kept = ctx.saved_tensors
        need_x, need_gates, need_w_in, need_w_out = ctx.needs_input_grad[:4]
        gates_dtype, w_in_dtype, w_out_dtype = ctx.dtypes
        N, K, D = per_token.shape
        grad_y = grad_y.to(per_token.dtype).unsqueeze(1)  # (N, 1, D)
        grad_gates = None
        if need_gates:
            grad_gates = (per_token * grad_y).sum(-1).to(gates_dtype)  # (N, K)
        grad_out = (grad_y * gates_c).view(N * K, D).index_select(0, order)  # (S, D) expert order
        need = (need_x, need_w_in, need_w_out)
        grads = _mlp_grouped_backward(grad_out, xs, kept, w_in_c, w_out_c, offs, ctx.activation,
                                      need)  # fmt: skip
        grad_x = None
        if need_x:  # back to token order, the K slots of a token summed
            grad_x = grads.xs.index_select(0, inverse).view(N, K, D).sum(1)
        grad_w_in = None if grads.w_in is None else grads.w_in.to(w_in_dtype)
        grad_w_out = None if grads.w_out is None else grads.w_out.to(w_out_dtype)
        return grad_x, grad_gates, grad_w_in, grad_w_out, None, None, None, None, None
