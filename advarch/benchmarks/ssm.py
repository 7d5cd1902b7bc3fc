"""Selective-scan benchmark: the fused CPU kernel and the log-depth parallel scan against the
sequential loop.

Shapes follow one Mamba layer of width 256: inner dim E=512, state N=16, batch 1, float32.
Contenders, forward (no grad) and forward + backward, at T = 1k, 4k, 16k (quick: 1k, 2k):
- `fused_selective_scan`, the C++ kernel of `selective_scan_cpu` (what `selective_scan` runs on
  CPU; skipped with a note if it could not be built);
- `selective_scan_parallel`, the odd-even parallel scan in torch ops (the portable path);
- `selective_scan_reference`, one Python iteration per time step (mamba's
  `selective_scan_ref`). At 16k the loop is not run: its cost is linear in T, so its 4k time is
  scaled ×4 and the contender name says so. `ratio` = ms / loop ms at the same T and pass;
  the target is linear growth in T and ≤ 0.05 at 4k.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from advarch.benchmarks.timing import Row, peak_memory_mb, time_ms
from advarch.models.blocks.selective_scan_cpu import fused_selective_scan, load_library
from advarch.models.blocks.ssm import selective_scan_parallel, selective_scan_reference

INNER, STATE = 512, 16


def _inputs(length: int) -> tuple[torch.Tensor, ...]:
    """u, Δ, A, B, C, D, z for one sequence, all requiring grad."""
    g = torch.Generator().manual_seed(0)
    u, z = (torch.randn(1, length, INNER, generator=g) for _ in range(2))
    delta = torch.exp(torch.empty(1, length, INNER).uniform_(-6.9, -2.3, generator=g))
    A = -torch.arange(1, STATE + 1.0).repeat(INNER, 1)
    B, C = (torch.randn(1, length, STATE, generator=g) for _ in range(2))
    return tuple(t.requires_grad_() for t in (u, delta, A, B, C, torch.ones(INNER), z))


def _pass(scan: Callable[..., torch.Tensor], inputs: tuple, backward: bool) -> Callable[[], object]:
    def run() -> object:
        if not backward:
            with torch.no_grad():
                return scan(*inputs)
        return scan(*inputs).sum().backward()

    return run


def run(quick: bool) -> list[Row]:
    """Time the three scans at each length; the loop is extrapolated beyond 4k."""
    lengths = (1024, 2048) if quick else (1024, 4096, 16384)
    contenders = [("advarch parallel scan", selective_scan_parallel, 1)]
    if load_library() is not None:
        contenders.insert(0, ("advarch fused CPU kernel", fused_selective_scan, 5))
    rows: list[Row] = []
    loop_ms: dict[tuple[int, str], float] = {}
    for length in lengths:
        inputs = _inputs(length)
        for backward, label in ((False, "fwd"), (True, "fwd+bwd")):
            if length <= 4096:
                loop = _pass(selective_scan_reference, inputs, backward)
                loop_ms[length, label] = time_ms(loop, repeat=1, warmup=0)
                name = "sequential loop"
            else:
                loop_ms[length, label] = loop_ms[4096, label] * length / 4096
                name = "sequential loop (4k × T/4k)"
            size = f"T={length} {label}"
            rows.append(Row("ssm scan", name, size, loop_ms[length, label], ratio=1.0))
            for contender, scan, repeat in contenders:
                fast = _pass(scan, inputs, backward)
                ms = time_ms(fast, repeat=repeat)
                rows.append(Row("ssm scan", contender, size, ms, peak_memory_mb(fast),
                                ms / loop_ms[length, label]))  # fmt: skip
    return rows
