"""CPU side by side with the peers' implementations (issue 14, item 5), float32, fwd + bwd.

- MoE, SwiGLU, top-2 of 8, 4,096 tokens, D 512, expert hidden 2048: HF Mixtral's sparse MoE
  block (eager experts) and a dense SwiGLU FFN of equal active FLOPs (hidden 4096). Targets:
  HF ≥ 1.2× advarch's time, advarch ≤ 1.05× dense.
- Sliding window, bidirectional, window 512 (256 each side), 8 heads × 64, T 16k, twice: the
  modules (HF Longformer's self-attention: q/k/v projections + its chunked band attention;
  advarch's: qkv + rotary + tiled band attention + output projection), and the attention alone
  (the projections replaced by copies of the input on both sides). Target ≥ 5× for the
  attention; the modules share ~0.6 s of projection matmuls that no attention kernel shortens.
- Mamba block, D 256 (inner 512, state 16), batch 1, T 4k: mambapy's block (parallel scan in
  PyTorch). Target ≥ 10×.

References that are not installed are left out (`pip install transformers mambapy`).
`ratio` = ms / advarch's ms for the MoE (HF ≥ 1.2, dense ≥ 0.95 meet the targets), ms / the
peer's ms for the others (advarch ≤ 0.2 and ≤ 0.1 meet them).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from torch import nn

from advarch.benchmarks.timing import Row, time_ms
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.sliding_window import SlidingWindowAttention, sliding_window_attention
from advarch.models.blocks.ssm import SelectiveSSM


def _pass(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
          module: nn.Module) -> Callable[[], None]:  # fmt: skip
    def run() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        fn(x).sum().backward()

    return run


def _measure(bench: str, size: str, x: torch.Tensor, contenders: dict, ref: str,
             repeat: int) -> list[Row]:  # fmt: skip
    """Median wall ms per contender, the contenders interleaved in each round, so that a load
    change on a shared machine hits all of them alike."""
    passes = {name: _pass(fn, x, module) for name, (fn, module) in contenders.items()}
    times: dict[str, list[float]] = {name: [] for name in passes}
    for run in passes.values():
        run()  # warm-up
    for _ in range(repeat):
        for name, run in passes.items():
            times[name].append(time_ms(run, repeat=1, warmup=0))
    ms = {name: statistics.median(t) for name, t in times.items()}
    return [Row(bench, name, size, t, ratio=t / ms[ref]) for name, t in ms.items()]


def skipped_reference(reference: str, err: ImportError) -> None:
    """Say which reference is missing from the table (an optional package not installed)."""
    print(f"{reference} skipped: {err.name or err} is not installed (× ref is then advarch's)")


def moe_rows(quick: bool) -> list[Row]:
    dim, hidden, tokens = (128, 512, 1024) if quick else (512, 2048, 4096)
    x = torch.randn(tokens // 512, 512, dim, requires_grad=True)
    moe = MoE(dim, hidden, 8, 2, activation="swiglu")
    dense = FeedForward(dim, 2 * hidden, "swiglu")
    contenders = {"advarch MoE": (lambda t: moe(t)[0], moe), "dense SwiGLU FFN": (dense, dense)}
    ref = "advarch MoE"
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(hidden_size=dim, intermediate_size=hidden, num_local_experts=8,
                               num_experts_per_tok=2)  # fmt: skip
        config._experts_implementation = "eager"
        hf = MixtralSparseMoeBlock(config)
        for p in hf.parameters():
            nn.init.normal_(p, std=0.02)
        contenders["HF Mixtral block (eager)"] = (hf, hf)
    except ImportError as err:
        skipped_reference("HF Mixtral MoE block", err)
    return _measure("moe swiglu", f"{tokens} tok D={dim}", x, contenders, ref, repeat=5)


def sliding_window_rows(quick: bool) -> list[Row]:
    """Two comparisons: the modules (projections included), and the attention alone (every
    projection a copy of the input on both sides: the band attention each library brings)."""
    T, heads, window = (2048, 8, 512) if quick else (16384, 8, 512)
    dim = heads * 64
    x = torch.randn(1, T, dim, requires_grad=True)
    ours = SlidingWindowAttention(dim, heads, window=window, causal=False)

    def attention_only(t: torch.Tensor) -> torch.Tensor:
        h = t.view(1, T, heads, 64).transpose(1, 2)
        return sliding_window_attention(h, h, h, window=window, causal=False)

    modules = {"advarch SlidingWindowAttention": (ours, ours)}
    attention = {"advarch sliding_window_attention": (attention_only, ours)}
    try:
        from transformers import LongformerConfig
        from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

        config = LongformerConfig(
            hidden_size=dim,
            num_attention_heads=heads,
            attention_window=[window],
            attention_probs_dropout_prob=0.0,
        )
        hf = LongformerSelfAttention(config, layer_id=0)
        copies = LongformerSelfAttention(config, layer_id=0)
        copies.query = copies.key = copies.value = _Copy()
        local = torch.zeros(1, T)  # 0 = local attention, no global or masked tokens
        none = torch.zeros(1, T, dtype=torch.bool)

        def longformer(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
            return lambda t: module(t, attention_mask=local, is_index_masked=none,
                                    is_index_global_attn=none, is_global_attn=False)[0]  # fmt: skip

        modules["HF LongformerSelfAttention"] = (longformer(hf), hf)
        attention["HF LongformerSelfAttention, projections = copies"] = (longformer(copies), copies)
    except ImportError as err:
        skipped_reference("HF LongformerSelfAttention", err)
    size = f"T={T} w={window}"
    return [
        *_measure("sliding window module", size, x, modules, next(reversed(modules)), repeat=3),
        *_measure(
            "sliding window attention", size, x, attention, next(reversed(attention)), repeat=3
        ),  # fmt: skip
    ]


class _Copy(nn.Module):
    """A projection that copies its input (Longformer scales its queries in place)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def ssm_rows(quick: bool) -> list[Row]:
    dim, T = (128, 1024) if quick else (256, 4096)
    x = torch.randn(1, T, dim, requires_grad=True)
    ours = SelectiveSSM(dim, d_state=16, expand=2)
    contenders = {"advarch SelectiveSSM": (ours, ours)}
    try:
        from mambapy.mamba import MambaBlock, MambaConfig

        theirs = MambaBlock(MambaConfig(d_model=dim, n_layers=1, d_state=16, expand_factor=2))
        contenders["mambapy MambaBlock"] = (theirs, theirs)
    except ImportError as err:
        skipped_reference("mambapy MambaBlock", err)
    ref = next(reversed(contenders))
    return _measure("mamba block", f"B=1 T={T} D={dim}", x, contenders, ref, repeat=5)


def run(quick: bool) -> list[Row]:
    """The three side-by-side comparisons (CPU float32)."""
    return moe_rows(quick) + sliding_window_rows(quick) + ssm_rows(quick)
