"""Tiled sliding-window attention vs dense SDPA with a boolean band mask (the reference).

8 heads × 64 head dim, window 512, batch 1, causal, float32; forward at every length and
forward + backward up to 4k tokens. ``ratio`` is ms / dense ms of the same pass and length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from advarch.benchmarks.timing import Row, peak_memory_mb, time_ms
from advarch.models.blocks.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_reference,
)

HEADS, HEAD_DIM, WINDOW = 8, 64, 512
DENSE = "dense SDPA band mask"
CONTENDERS = {
    DENSE: sliding_window_attention_reference,
    "tiled band attention": sliding_window_attention,
}


def _passes(attn: Callable[..., torch.Tensor], T: int, backward: bool) -> Callable[[], None]:
    """A closure running one forward (no grad) or forward + backward at length T."""
    q, k, v = (torch.randn(1, HEADS, T, HEAD_DIM, requires_grad=backward) for _ in range(3))
    grad = torch.randn(1, HEADS, T, HEAD_DIM)

    def run() -> None:
        with torch.set_grad_enabled(backward):
            out = attn(q, k, v, window=WINDOW, causal=True)
            if backward:
                out.backward(grad)

    return run


def run(quick: bool) -> list[Row]:
    """Time and peak memory of both contenders; forward + backward up to 4k tokens."""
    rows = []
    for T in (1024, 2048) if quick else (1024, 4096, 16384):
        for backward in (False, True) if T <= 4096 else (False,):
            measured = {}  # contender → (ms, peak MiB)
            for name, attn in CONTENDERS.items():
                fn = _passes(attn, T, backward)
                measured[name] = time_ms(fn, repeat=3 if T <= 4096 else 1), peak_memory_mb(fn)
            dense_ms = measured[DENSE][0]
            rows += [
                Row(
                    bench="sliding_window",
                    contender=f"{name} {'fwd+bwd' if backward else 'fwd'}",
                    size=f"T={T} w={WINDOW}",
                    ms=ms,
                    peak_mb=peak,
                    ratio=ms / dense_ms,
                )
                for name, (ms, peak) in measured.items()
            ]
    return rows
