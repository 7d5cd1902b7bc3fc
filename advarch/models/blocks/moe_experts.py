"""Running MoE experts on token rows grouped by expert: grouped matmul or a loop, and the
accelerators' dropless dispatch as one autograd node.

Rows are sorted by expert, so expert e owns one contiguous block; (E,) per-expert row counts
on the device say where the blocks are. The grouped matmul takes their int32 end offsets
(never read by the host); the loop of E dense matmuls that CPU and exotic dtypes use reads the
counts back to the host.

`DroplessExperts` is the whole dropless path on the grouped matmul: gather the token-slots
into expert order, run the experts, gather back and mix by the gates. On accelerators the MoE
block is bound by per-op host overhead (issue 14: its forward + backward took as long at 512
tokens as at 16,384), so that path is one autograd node with a written-out backward, and its
row moves (`gather_rows`, `combine`, `combine_backward`) are one Triton kernel each on CUDA
(`moe_permute_triton`; these torch functions are their plain reference). Tokens move by
gathers both ways (no scatter, no atomics). The loop path stays autograd's composition
(`expert_mlp`): on CPU it is as fast, and it is the node's plain reference. Under
torch.compile the loop runs as one custom operator (`expert_mlp_loop`, the same written-out
backward): reading the counts inside a traced graph would break it, and a break in the layer
loop makes torch.compile leave the whole model uncompiled.

Shapes: N tokens, K experts per token, S = N·K slots, D model dim, E experts, H the experts'
first-layer width (2·hidden for SwiGLU's fused gate and up projections).
"""

from __future__ import annotations

import functools
import sys
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from advarch.models.blocks.triton_modules import triton_module

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_PROBED: dict[tuple[torch.dtype, str], bool] = {}

Groups = torch.Tensor | list[int]  # int32 end offsets (grouped matmul) or host row counts (loop)


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


def expert_offsets(counts: torch.Tensor) -> torch.Tensor:
    """The int32 end row of each expert's block, from (E,) per-expert counts (grouped matmul)."""
    return counts.cumsum(0, dtype=torch.int32)


def expert_mlp(xs: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, counts: torch.Tensor,
               grouped: bool, activation: str) -> torch.Tensor:  # fmt: skip
    """Expert e's MLP on its block of rows xs (S, D) → (S, D), the blocks' sizes (E,) counts on
    the device: grouped matmuls or a loop, recorded by autograd (under torch.compile the loop
    is the `expert_mlp_loop` operator). The stacked weights are cast to xs's dtype."""
    w_in, w_out = w_in.to(xs.dtype), w_out.to(xs.dtype)
    if grouped:
        return _mlp(xs, w_in, w_out, expert_offsets(counts), activation)[1]
    if torch.compiler.is_compiling():
        return expert_mlp_loop(xs, w_in, w_out, counts, activation)[0]
    # unbind, not w_in[e]: each indexing op would backprop a full (E, …) zero gradient
    blocks = zip(xs.split(counts.tolist()), w_in.unbind(0), w_out.unbind(0), strict=True)
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


def _gmm(a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Each block of rows of a (S, K) times its expert's b[e] (E, K, M): (S, M)."""
    if isinstance(groups, torch.Tensor):
        return _GROUPED_MM(a, b, offs=groups)
    return torch.cat([x @ w for x, w in zip(a.split(groups), b.unbind(0), strict=True)])


def _gmm_weight_grad(a: torch.Tensor, g: torch.Tensor, groups: Groups) -> torch.Tensor:
    """a_eᵀ g_e for the row blocks of a (S, K) and g (S, M): the experts' (E, K, M) gradient."""
    if isinstance(groups, torch.Tensor):
        return _GROUPED_MM(a.t(), g, offs=groups)
    pairs = zip(a.split(groups), g.split(groups), strict=True)
    return torch.stack([x.t() @ y for x, y in pairs])


def _mlp(xs: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, groups: Groups,
         activation: str) -> tuple[list[torch.Tensor], torch.Tensor]:  # fmt: skip
    """Every expert's MLP: ([pre-activation (S, H), activation, what the activation's
    backward needs], output (S, D))."""
    pre = _gmm(xs, w_in, groups)
    h, saved = activate_saving(pre, activation)
    return [pre, h, *saved], _gmm(h, w_out, groups)


def _mlp_backward(grad_out: torch.Tensor, xs: torch.Tensor, kept: list[torch.Tensor],
                  w_in: torch.Tensor, w_out: torch.Tensor, groups: Groups, activation: str,
                  need: tuple[bool, bool, bool]) -> _MLPGrads:  # fmt: skip
    """Gradients of `_mlp` for grad_out (S, D)."""
    need_x, need_w_in, need_w_out = need
    pre, h, *saved = kept
    grad_w_out = _gmm_weight_grad(h, grad_out, groups) if need_w_out else None
    if not (need_x or need_w_in):
        return _MLPGrads(None, None, grad_w_out)
    grad_h = _gmm(grad_out, w_out.transpose(1, 2), groups)
    grad_pre = activate_backward(grad_h, pre, activation, saved)
    grad_xs = _gmm(grad_pre, w_in.transpose(1, 2), groups) if need_x else None
    grad_w_in = _gmm_weight_grad(xs, grad_pre, groups) if need_w_in else None
    return _MLPGrads(grad_xs, grad_w_in, grad_w_out)


@torch.library.custom_op("advarch::expert_mlp_loop", mutates_args=())
def expert_mlp_loop(xs: Tensor, w_in: Tensor, w_out: Tensor, counts: Tensor,
                    activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`expert_mlp`'s loop as one operator, which torch.compile keeps whole (it reads the
    counts inside): the output (S, D), then what its backward needs (pre-activation,
    activation, SwiGLU's silu(gate) or an empty tensor), which are not differentiable."""
    (pre, h, *saved), out = _mlp(xs, w_in, w_out, counts.tolist(), activation)
    return out, pre, h, saved[0] if saved else xs.new_empty(0)


@expert_mlp_loop.register_fake
def _(xs, w_in, w_out, counts, activation):
    rows, width, hidden = xs.shape[0], w_in.shape[2], w_out.shape[1]
    silu_gate = xs.new_empty(rows, hidden) if activation == "swiglu" else xs.new_empty(0)
    return xs.new_empty(rows, w_out.shape[2]), xs.new_empty(rows, width), \
        xs.new_empty(rows, hidden), silu_gate  # fmt: skip


@torch.library.custom_op("advarch::expert_mlp_loop_backward", mutates_args=())
def _expert_mlp_loop_backward(
    grad_out: Tensor, xs: Tensor, pre: Tensor, h: Tensor, silu_gate: Tensor, w_in: Tensor,
    w_out: Tensor, counts: Tensor, activation: str, need: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`_mlp_backward` of the loop; an empty tensor for each gradient not needed."""
    kept = [pre, h, *([silu_gate] if activation == "swiglu" else [])]
    grads = _mlp_backward(grad_out, xs, kept, w_in, w_out, counts.tolist(), activation,
                          tuple(need))  # fmt: skip
    return tuple(xs.new_empty(0) if g is None else g for g in grads)


@_expert_mlp_loop_backward.register_fake
def _(grad_out, xs, pre, h, silu_gate, w_in, w_out, counts, activation, need):
    wanted = zip((xs, w_in, w_out), need, strict=True)
    return tuple(t.new_empty(t.shape if n else (0,)) for t, n in wanted)


def _loop_setup_context(ctx, inputs, output) -> None:
    xs, w_in, w_out, counts, activation = inputs
    _, pre, h, silu_gate = output
    ctx.mark_non_differentiable(pre, h, silu_gate)
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs only kept
    ctx.save_for_backward(xs, pre, h, silu_gate, w_in, w_out, counts)
    ctx.activation = activation


def _loop_backward(ctx, grad_out: torch.Tensor | None, *_kept: None):
    need = list(ctx.needs_input_grad[:3])
    if grad_out is None:  # nothing flowed back into the output (grads are not materialised)
        return None, None, None, None, None
    grads = _expert_mlp_loop_backward(grad_out.contiguous(), *ctx.saved_tensors, ctx.activation,
                                      need)  # fmt: skip
    return *(g if n else None for g, n in zip(grads, need, strict=True)), None, None


expert_mlp_loop.register_autograd(_loop_backward, setup_context=_loop_setup_context)


def gather_rows(x: torch.Tensor, order: torch.Tensor, top_k: int, dtype: torch.dtype
                ) -> torch.Tensor:  # fmt: skip
    """The token rows of the slots in expert order, x[order // top_k] in `dtype`: (S, D)."""
    return x.to(dtype).index_select(0, order // top_k)


def combine(out: torch.Tensor, inverse: torch.Tensor, gates: torch.Tensor | None, top_k: int,
            dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """Each token's K rows of out (S, D, expert order), mixed by gates (N, K) or summed (None,
    the backward of `gather_rows`): (N, D) in `dtype`."""
    per_token = out.index_select(0, inverse).view(-1, top_k, out.shape[1])  # (N, K, D)
    if gates is not None:
        per_token = per_token * gates.unsqueeze(-1).to(out.dtype)
    return per_token.sum(1).to(dtype)


def combine_backward(grad_y: torch.Tensor, out: torch.Tensor, gates: torch.Tensor,
                     order: torch.Tensor, inverse: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`combine`'s gradients for grad_y (N, D): for out (S, D), expert order, in out's dtype,
    and for the gates (N, K) in their dtype."""
    N, K = gates.shape
    grad_y = grad_y.to(out.dtype).unsqueeze(1)  # (N, 1, D)
    per_token = out.index_select(0, inverse).view(N, K, -1)
    grad_gates = (per_token * grad_y).sum(-1, dtype=gates.dtype)
    grad_out = (grad_y * gates.unsqueeze(-1).to(out.dtype)).view(N * K, -1).index_select(0, order)
    return grad_out, grad_gates


def _row_moves(triton: bool):
    """What moves `DroplessExperts`' rows: the Triton kernels, or this module's torch functions
    (their plain reference, and where Triton is not installed)."""
    return (triton_module("moe_permute_triton") if triton else None) or sys.modules[__name__]


class DroplessExperts(torch.autograd.Function):
    """y[n] = Σ_k gates[n, k] · expert_{e(n, k)}(x[n]) for every token n, the experts run as
    grouped matmuls: one autograd node.

    Slot n·K + k is token n's k-th choice; `order` lists the slots sorted by expert, `inverse`
    is its inverse permutation and `offs` (E,) int32 the end row of each expert's block.
    Inputs: x (N, D) in any dtype, gates (N, K) float32, the stacked weights w_in (E, D, H),
    w_out (E, H/m, D) in any dtype; the experts run in `dtype` (weights and rows cast there;
    gradients come back in each input's dtype); rows move by `gather_rows` / `combine`, as
    Triton kernels with `triton`; `keep`: whether a backward will follow (grad mode on). The
    backward skips the gradients nobody asked for (frozen experts, a frozen input).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, gates: torch.Tensor, w_in: torch.Tensor,
                w_out: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor,
                offs: torch.Tensor, activation: str, dtype: torch.dtype, triton: bool,
                keep: bool) -> torch.Tensor:  # fmt: skip
        K, moves = gates.shape[1], _row_moves(triton)
        w_in_c, w_out_c = w_in.to(dtype), w_out.to(dtype)
        xs = moves.gather_rows(x, order, K, dtype)  # (S, D) in expert order
        kept, out = _mlp(xs, w_in_c, w_out_c, offs, activation)  # kept: pre, h, …
        y = moves.combine(out, inverse, gates, K, dtype)  # (N, D)
        if keep:
            ctx.save_for_backward(xs, out, gates, w_in_c, w_out_c, order, inverse, offs, *kept)
            ctx.activation, ctx.triton = activation, triton
            ctx.dtypes = (x.dtype, w_in.dtype, w_out.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        xs, out, gates, w_in_c, w_out_c, order, inverse, offs, *kept = ctx.saved_tensors
        need_x, need_gates, need_w_in, need_w_out = ctx.needs_input_grad[:4]
        x_dtype, w_in_dtype, w_out_dtype = ctx.dtypes
        moves = _row_moves(ctx.triton)
        grad_out, grad_gates = moves.combine_backward(grad_y, out, gates, order, inverse)
        need = (need_x, need_w_in, need_w_out)
        grads = _mlp_backward(grad_out, xs, kept, w_in_c, w_out_c, offs, ctx.activation, need)
        grad_x = None
        if need_x:  # back to token order, the K slots of a token summed
            grad_x = moves.combine(grads.xs, inverse, None, gates.shape[1], x_dtype)
        grad_w_in = None if grads.w_in is None else grads.w_in.to(w_in_dtype)
        grad_w_out = None if grads.w_out is None else grads.w_out.to(w_out_dtype)
        grad_gates = grad_gates if need_gates else None
        return grad_x, grad_gates, grad_w_in, grad_w_out, *[None] * 7
