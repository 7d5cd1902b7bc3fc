"""MoE benchmark: top-2 of 8 GELU experts against a dense FFN with the same active FLOPs.

Contenders (forward, and forward + backward):
- advarch MoE with the grouped-matmul dispatch, and with the loop-over-experts fallback;
- a naive per-token loop over each token's K experts, timed on a subset of tokens and scaled
  linearly to all tokens (its cost is linear in tokens; the full run would take minutes);
- the reference: a dense GELU FeedForward of hidden K·H, i.e. the FLOPs one token spends in
  the MoE. `ratio` = ms / dense-FFN ms; the target is ≤ 1.5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from advarch.benchmarks.timing import Row, peak_memory_mb, time_ms
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.moe_experts import activate, grouped_mm_supported

NAIVE_TOKENS = 32  # tokens the naive loop really runs; its time is scaled by N / NAIVE_TOKENS


def naive_per_token(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Each token through each of its K experts one at a time (the slow baseline)."""
    xf = x.reshape(-1, x.shape[-1])  # (N, D)
    probs = torch.softmax(xf @ moe.router.T, dim=-1)  # (N, E)
    gates, experts = probs.topk(moe.top_k, dim=-1)  # (N, K)
    gates = gates / gates.sum(-1, keepdim=True)
    rows = []
    for n in range(xf.shape[0]):
        row = xf.new_zeros(xf.shape[1])
        for g, e in zip(gates[n], experts[n].tolist(), strict=True):
            row = row + g * (activate(xf[n] @ moe.w_in[e], moe.activation) @ moe.w_out[e])
        rows.append(row)
    return torch.stack(rows).reshape(x.shape)


def _fwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return fn(x)

    return run


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        x.grad = None
        fn(x).sum().backward()
        return x.grad

    return run


def run(quick: bool) -> list[Row]:
    """Time every contender in float32 on CPU (or CUDA when present)."""
    dim, hidden, batch, seq = (128, 512, 2, 256) if quick else (512, 2048, 4, 1024)
    experts, k = 8, 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    moe = MoE(dim, hidden, num_experts=experts, top_k=k).to(device)
    dense = FeedForward(dim, k * hidden).to(device)
    x = torch.randn(batch, seq, dim, device=device, requires_grad=True)
    tokens = batch * seq
    size = f"N={tokens} D={dim}"
    scale = tokens / NAIVE_TOKENS
    subset = x.detach().reshape(1, tokens, dim)[:, :NAIVE_TOKENS].clone().requires_grad_(True)

    def moe_path(grouped: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(inp: torch.Tensor) -> torch.Tensor:
            moe.use_grouped_mm = grouped
            return moe(inp)[0]

        return fn

    contenders: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], float]] = [
        (f"dense FFN (hidden {k * hidden})", dense, 1.0),
        ("advarch MoE grouped_mm", moe_path(True), 1.0),
        ("advarch MoE loop/experts", moe_path(False), 1.0),
        (
            f"naive/token ({NAIVE_TOKENS}tok×{scale:g})",
            lambda inp: naive_per_token(moe, inp),
            scale,
        ),
    ]
    if not grouped_mm_supported(x.dtype, device):
        contenders.pop(1)
    rows: list[Row] = []
    for mode, wrap in (("fwd", _fwd), ("fwd+bwd", _fwd_bwd)):
        ref_ms = float("nan")
        for name, fn, factor in contenders:
            inp = x if factor == 1.0 else subset
            call = wrap(fn, inp)
            ms = time_ms(call, repeat=3 if factor == 1.0 else 1) * factor
            ref_ms = ms if name.startswith("dense") else ref_ms
            peak = peak_memory_mb(call) if factor == 1.0 else float("nan")
            rows.append(Row(f"moe {mode}", name, size, ms, peak, ms / ref_ms))
    return rows
