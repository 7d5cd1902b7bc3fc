"""GPU benchmark at the sizes of issue 14, every contender in one process (`--device cuda`).

Forward + backward under bf16 autocast (attention inputs in bf16), median of ``REPEAT`` CUDA-
event timings after ``WARMUP`` untimed calls; peak memory is the most the pass allocates above
what was live before it (inputs and weights excluded). `ratio` = ms / the row's reference ms;
`host ms` = how long the call took to return on the host: close to ms, the pass is bound by
per-op host overhead (the MoE's case at these sizes), far below, by its kernels.

- MoE, top-2 of 8 experts, D 1024, expert hidden 2816, 16,384 tokens (and 512 for SwiGLU):
  reference the dense FFN of equal active FLOPs (hidden 5632); HF Mixtral's sparse MoE block
  (its eager and grouped_mm experts) when `transformers` is installed. Targets: ≤ 1.25× dense
  at 16k, ≤ 2× at 512, HF's faster path ≥ 1.5× slower than advarch.
- Sliding window, causal, w 512, 16 heads × 64, T 8k and 32k: reference FlexAttention itself
  (compiled, its own band block mask); also advarch's blocked path and dense SDPA with a band
  mask. Target: advarch ≤ 1.15× FlexAttention in time and peak memory.
- Mamba block, batch 8, D 1024 (inner 2048, state 16), T 2k and 8k: reference mambapy's block
  (parallel scan in PyTorch) when installed. Target: ≥ 8× faster (ratio ≤ 0.125), linear in T.

`print_target_checks` ends the table with these targets, each met (✓) or missed (✗).
`print_moe_profiles` (`--profile`) profiles the eager MoE and its dense reference instead: aten
ops and kernel launches per pass and the ops with the most host and device time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from advarch.benchmarks.timing import Row, native_stderr_silenced
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_blocked,
    sliding_window_attention_reference,
)
from advarch.models.blocks.ssm import SelectiveSSM

REPEAT, WARMUP = 10, 3
DEVICE = "cuda"
DIM, HIDDEN, EXPERTS, TOP_K = 1024, 2816, 8, 2
MOE_CASES = (("gelu", 16384), ("swiglu", 16384), ("swiglu", 512))  # activation, tokens
HEADS, HEAD_DIM, WINDOW = 16, 64, 512
SWA_LENGTHS = (8192, 32768)
SSM_BATCH, SSM_LENGTHS = 8, (2048, 8192)
SCAN_TILES = ((16, 32, 8), (16, 16, 4), (8, 32, 4), (32, 16, 8), (16, 64, 8), (8, 16, 2))


def cuda_time(fn: Callable[[], object], repeat: int = REPEAT) -> tuple[float, float, float]:
    """(median ms, peak MiB above the memory live before, median host ms) of ``fn`` on the
    current device. Host ms is how long ``fn()`` took to return, i.e. to launch its kernels:
    when it is close to ms, the GPU waited on the host (per-op overhead, not kernels)."""
    for _ in range(WARMUP):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch = time.perf_counter()
        fn()
        host.append((time.perf_counter() - launch) * 1e3)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return statistics.median(times), peak, statistics.median(host)


def train_pass(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               params: list[nn.Parameter]) -> Callable[[], None]:  # fmt: skip
    """One forward + backward of ``fn(x)`` under bf16 autocast, gradients cleared first."""

    def run() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = fn(x)
        out.float().sum().backward()

    return run


def _rows(bench: str, size: str, measured: dict[str, tuple[float, float, float]],
          ref: str) -> list[Row]:  # fmt: skip
    ref_ms = measured[ref][0]
    return [
        Row(bench, name, size, ms, peak, ms / ref_ms, host)
        for name, (ms, peak, host) in measured.items()
    ]


def _mixtral(activation_dim: int, hidden: int, implementation: str) -> nn.Module | None:
    """HF Mixtral's sparse MoE block with the given experts implementation (None if absent)."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(hidden_size=activation_dim, intermediate_size=hidden,
                           num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)  # fmt: skip
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    return block


class _Compiled(nn.Module):
    """A module run through torch.compile (Inductor), its parameters those of the original."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module)

    def forward(self, x: torch.Tensor) -> tuple:
        return self.compiled(x)


Contender = tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]  # module, its call on x


def _moe_contenders(
    activation: str, tokens: int, references: bool = True
) -> tuple[torch.Tensor, dict[str, Contender]]:
    """The input and the contenders of one MoE case, each as (module, its call on x): the
    dense FFN of equal active FLOPs first (the reference), advarch's MoE eager (its Triton
    routing and token moves, then torch's: what the kernels gain) and compiled, and with
    ``references`` HF Mixtral's block (SwiGLU at the largest size, when installed)."""
    x = torch.randn(tokens // 512, 512, DIM, device=DEVICE, requires_grad=True)
    dense = FeedForward(DIM, TOP_K * HIDDEN, activation)
    ours = MoE(DIM, HIDDEN, EXPERTS, TOP_K, activation=activation)
    plain = MoE(DIM, HIDDEN, EXPERTS, TOP_K, activation=activation)
    plain.use_triton = False
    compiled = _Compiled(ours)  # Inductor fuses the torch routing and moves
    contenders = {
        f"dense FFN h{TOP_K * HIDDEN}": (dense, dense),
        "advarch MoE": (ours, lambda inp: ours(inp)[0]),
        "advarch MoE, torch routing + moves": (plain, lambda inp: plain(inp)[0]),
        "advarch MoE compiled": (compiled, lambda inp: compiled(inp)[0]),
    }
    if references and activation == "swiglu" and tokens == max(t for _, t in MOE_CASES):
        for impl in ("eager", "grouped_mm"):
            block = _mixtral(DIM, HIDDEN, impl)
            if block is not None:
                contenders[f"HF Mixtral ({impl} experts)"] = (block, block)
    return x, contenders


def moe_rows() -> list[Row]:
    rows = []
    for activation, tokens in MOE_CASES:
        x, contenders = _moe_contenders(activation, tokens)
        measured = {}
        for name, (module, call) in contenders.items():
            module.to(DEVICE)
            measured[name] = cuda_time(train_pass(call, x, list(module.parameters())))
            module.cpu()
        size = f"{tokens} tok {activation}"
        rows += _rows("moe fwd+bwd", size, measured, ref=next(iter(contenders)))
    return rows


def op_profile(run: Callable[[], None], passes: int = 3, top: int = 12) -> str:
    """Where a pass of ``run`` spends its time: aten ops and kernel launches per pass, and the
    ops with the most self time on the host and, on CUDA, on the device. For a block bound by
    host overhead this says which ops to fuse; for one bound by kernels, which kernels."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    for _ in range(WARMUP):
        run()
    with native_stderr_silenced(), profile(activities=activities) as prof:
        for _ in range(passes):
            run()
        if on_cuda:
            torch.cuda.synchronize()
    events = prof.events()
    aten = sum(e.name.startswith("aten::") and not _under_aten(e) for e in events) / passes
    launches = sum("LaunchKernel" in e.name for e in events) / passes
    averages = prof.key_averages()
    sorts = ["self_cpu_time_total", *(["self_device_time_total"] if on_cuda else [])]
    tables = [averages.table(sort_by=key, row_limit=top, max_name_column_width=48)
              for key in sorts]  # fmt: skip
    head = f"{aten:.0f} aten ops, {launches:.0f} kernel launches per pass"
    return "\n".join([head, *tables])


def _under_aten(event) -> bool:
    """Whether a profiler event runs inside another aten op (not dispatched by the caller)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def print_moe_profiles() -> None:
    """`op_profile` of advarch's eager MoE (Triton routing and moves, then torch's) and its
    dense reference in every MoE case."""
    for activation, tokens in MOE_CASES:
        x, contenders = _moe_contenders(activation, tokens, references=False)
        for name in list(contenders)[:3]:  # dense, MoE, MoE with torch routing + moves
            module, call = contenders[name]
            module.to(DEVICE)
            report = op_profile(train_pass(call, x, list(module.parameters())))
            print(f"== {name}, {tokens} tokens, {activation}: {report}", flush=True)
            module.cpu()


def _flex_reference(T: int) -> Callable[..., torch.Tensor]:
    """FlexAttention with the sliding-window mask of its own documentation, compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def band(b, h, q, kv):
        return (q >= kv) & (q - kv < WINDOW)

    block_mask = create_block_mask(band, None, None, T, T, device="cuda", _compile=True)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, **_: flex(q, k, v, block_mask=block_mask)


def sliding_window_rows() -> list[Row]:
    rows = []
    for T in SWA_LENGTHS:
        q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))  # fmt: skip
        contenders = {
            "FlexAttention (compiled)": _flex_reference(T),
            "advarch sliding_window": sliding_window_attention,
            "advarch blocked path": sliding_window_attention_blocked,
            "dense SDPA band mask": sliding_window_attention_reference,
        }
        measured = {}
        for name, attn in contenders.items():

            def call(inp: torch.Tensor, attn=attn, k=k, v=v) -> torch.Tensor:
                return attn(inp, k, v, window=WINDOW, causal=True)

            measured[name] = cuda_time(train_pass(call, q, [k, v]))
        rows += _rows("sliding_window", f"T={T} w={WINDOW}", measured, "FlexAttention (compiled)")
    return rows


def _mambapy_block() -> nn.Module | None:
    try:
        from mambapy.mamba import MambaBlock, MambaConfig
    except ImportError:
        return None
    return MambaBlock(MambaConfig(d_model=DIM, n_layers=1, d_state=16, expand_factor=2))


def scan_tile_rows() -> list[Row]:
    """The Triton scan alone (fwd+bwd, the block's inner size) per tile shape (CHUNK, BLOCK_E,
    warps), against the torch parallel scan; leaves the fastest tiles set for the block rows."""
    from advarch.models.blocks import selective_scan_triton as st
    from advarch.models.blocks.ssm import selective_scan_parallel

    B, T, E, N = SSM_BATCH, max(SSM_LENGTHS), 2 * DIM, 16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    u, z = (torch.randn(B, T, E, device=DEVICE, generator=g).bfloat16() for _ in "uz")
    delta = torch.rand(B, T, E, device=DEVICE, generator=g) * 0.1 + 1e-3
    Bm, Cm = (torch.randn(B, T, N, device=DEVICE, generator=g).bfloat16() for _ in "BC")
    A = -torch.arange(1, N + 1.0, device=DEVICE).repeat(E, 1)
    inputs = [t.requires_grad_() for t in (u, delta, A, Bm, Cm, torch.ones(E, device=DEVICE), z)]

    def scan_pass(scan: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for t in inputs:
                t.grad = None
            scan(*inputs).sum().backward()

        return run

    measured = {"torch parallel scan": cuda_time(scan_pass(selective_scan_parallel), repeat=3)}
    for chunk, block_e, warps in SCAN_TILES:
        st.CHUNK, st.BLOCK_E, st.NUM_WARPS = chunk, block_e, warps
        try:
            measured[f"triton c{chunk} e{block_e} w{warps}"] = cuda_time(
                scan_pass(st.triton_selective_scan)
            )
        except Exception as err:  # a tile shape the compiler rejects (e.g. out of resources)
            print(f"triton scan c{chunk} e{block_e} w{warps}: {type(err).__name__}: {err}"[:300])
    tiles = [k for k in measured if k.startswith("triton")]
    if tiles:
        best = min(tiles, key=lambda k: measured[k][0])
        st.CHUNK, st.BLOCK_E, st.NUM_WARPS = (int(p[1:]) for p in best.split()[1:])
        print(f"fastest scan tiles: {best}", flush=True)
    return _rows("ssm scan", f"B={B} T={T} E={E}", measured, "torch parallel scan")


def ssm_rows() -> list[Row]:
    rows = scan_tile_rows()
    torch.manual_seed(0)
    contenders = {"advarch SelectiveSSM": SelectiveSSM(DIM, d_state=16, expand=2)}
    mambapy = _mambapy_block()
    if mambapy is not None:
        contenders = {"mambapy MambaBlock": mambapy, **contenders}
    for T in SSM_LENGTHS:
        x = torch.randn(SSM_BATCH, T, DIM, device=DEVICE, requires_grad=True)
        measured = {}
        for name, module in contenders.items():
            module.to(DEVICE)
            measured[name] = cuda_time(train_pass(module, x, list(module.parameters())))
            module.cpu()
        ref = "mambapy MambaBlock" if mambapy is not None else "advarch SelectiveSSM"
        rows += _rows("mamba block", f"B={SSM_BATCH} T={T} D={DIM}", measured, ref)
    return rows


SECTIONS = {"sliding_window": sliding_window_rows, "ssm": ssm_rows, "moe": moe_rows}

# issue 14's targets: MoE ≤ 1.25× dense at 16k tokens, ≤ 2× at 512, HF Mixtral's faster path
# ≥ 1.5× slower; sliding window ≤ 1.15× FlexAttention in time and memory; Mamba block ≥ 8×
# faster than mambapy's and linear in T (allowed: time growing up to 1.15× faster than T)
MOE_LIMIT = {16384: 1.25, 512: 2.0}
HF_SLOWER, SWA_LIMIT, MAMBA_LIMIT, MAMBA_LINEAR = 1.5, 1.15, 0.125, 1.15


def target_checks(rows: list[Row]) -> list[tuple[bool, str]]:
    """Issue 14's GPU targets that the rows of one run can decide: (met, one line) each."""
    at = {(r.bench, r.size, r.contender): r for r in rows}
    checks: list[tuple[bool, str]] = []
    for activation, tokens in MOE_CASES:
        size = f"{tokens} tok {activation}"
        ours = at.get(("moe fwd+bwd", size, "advarch MoE"))
        dense = at.get(("moe fwd+bwd", size, f"dense FFN h{TOP_K * HIDDEN}"))
        if ours is None or dense is None:
            continue
        limit, ratio = MOE_LIMIT[tokens], ours.ms / dense.ms
        checks.append((ratio <= limit, f"MoE {size}: {ratio:.2f}× the dense FFN (≤ {limit})"))
        hf = [r for key, r in at.items() if key[:2] == ("moe fwd+bwd", size)
              and r.contender.startswith("HF Mixtral")]  # fmt: skip
        if hf:
            fastest = min(hf, key=lambda r: r.ms)
            slower = fastest.ms / ours.ms
            text = f"MoE {size}: {fastest.contender} {slower:.2f}× slower (≥ {HF_SLOWER})"
            checks.append((slower >= HF_SLOWER, text))
    for T in SWA_LENGTHS:
        size = f"T={T} w={WINDOW}"
        ours = at.get(("sliding_window", size, "advarch sliding_window"))
        flex = at.get(("sliding_window", size, "FlexAttention (compiled)"))
        if ours is not None and flex is not None:
            time_ratio, memory_ratio = ours.ms / flex.ms, ours.peak_mb / flex.peak_mb
            text = (f"sliding window {size}: {time_ratio:.2f}× FlexAttention's time, "
                    f"{memory_ratio:.2f}× its memory (≤ {SWA_LIMIT})")  # fmt: skip
            checks.append((max(time_ratio, memory_ratio) <= SWA_LIMIT, text))
    short, long = min(SSM_LENGTHS), max(SSM_LENGTHS)
    ours_short, ours, ref = (at.get(("mamba block", f"B={SSM_BATCH} T={T} D={DIM}", name))
                             for T, name in ((short, "advarch SelectiveSSM"),
                                             (long, "advarch SelectiveSSM"),
                                             (long, "mambapy MambaBlock")))  # fmt: skip
    if ours is not None and ref is not None:
        ratio = ours.ms / ref.ms
        text = f"Mamba block T={long}: {ratio:.3f}× mambapy's time (≤ {MAMBA_LIMIT})"
        checks.append((ratio <= MAMBA_LIMIT, text))
    if ours is not None and ours_short is not None:
        growth, limit = ours.ms / ours_short.ms, MAMBA_LINEAR * long / short
        text = f"Mamba block: ×{growth:.2f} time for ×{long // short} T (≤ ×{limit:.1f})"
        checks.append((growth <= limit, text))
    return checks


def print_target_checks(rows: list[Row]) -> None:
    """One line per target: met (✓) or missed (✗), with the measured ratio."""
    checks = target_checks(rows)
    if checks:
        print(f"targets (issue 14): {sum(met for met, _ in checks)} of {len(checks)} met")
    for met, text in checks:
        print(f"{'✓' if met else '✗'} {text}")


def require_cuda() -> None:
    """Stop with one line when the benchmark device is CUDA and there is no GPU."""
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False)"
        )


def run(quick: bool = False, only: tuple[str, ...] = tuple(SECTIONS)) -> list[Row]:
    """The GPU sections named in ``only`` (``quick`` is ignored: these are the issue's sizes)."""
    require_cuda()
    rows: list[Row] = []
    for name in only:
        section_rows = SECTIONS[name]()
        rows += section_rows
        for r in section_rows:  # as they come, in case a later section fails
            print(f"{r.bench} | {r.contender} | {r.size} | {r.ms:.3f} ms | {r.peak_mb:.0f} MiB | "
                  f"{r.ratio:.3f}", flush=True)  # fmt: skip
    return rows
