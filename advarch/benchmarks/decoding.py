"""Decoding benchmark: new tokens per second of each model with its per-layer caches against
the full forward on the whole prefix at every step (`use_cache=False`), greedy, batch 1.

`scripts/generate.py bench=true` prints `speed_table(benchmark_decoding(...))`; the README's
benchmark table quotes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from advarch.benchmarks.timing import SMOKE_NOTE
from advarch.generation import Retrieve, generate

SMOKE_TOKENS = 64  # fewer new tokens: prefill and per-call overhead outweigh the cache


@dataclass
class DecodeSpeed:
    """Tokens per second of one model with and without the cache."""

    model: str
    params: int
    cached: float
    uncached: float

    @property
    def speedup(self) -> float:
        return self.cached / self.uncached


def decoding_speed(
    model: nn.Module,
    prompt_len: int = 64,
    new_tokens: int = 512,
    seed: int = 0,
    retrieve: Retrieve | None = None,
) -> tuple[float, float]:
    """(cached, uncached) new tokens per second for one row, greedy, from a random prompt.

    The clock covers prompt prefill, generation and (RETRO) retrieval, as a user waits for all;
    both ways decode two tokens first, untimed, so neither pays the first call's setup.
    """
    vocab = model.spec.vocab_size
    prompt = torch.randint(
        0, min(vocab, 256), (1, prompt_len), generator=torch.Generator().manual_seed(seed)
    )
    for use_cache in (True, False):  # warm-up: first calls pay for kernels, caches, allocations
        generate(model, prompt, 2, greedy=True, use_cache=use_cache, retrieve=retrieve)
    rates = []
    for use_cache in (True, False):
        start = time.perf_counter()
        out = generate(
            model, prompt, new_tokens, greedy=True, use_cache=use_cache, retrieve=retrieve
        )
        rates.append((out.shape[1] - prompt_len) / (time.perf_counter() - start))
    return rates[0], rates[1]


def benchmark_decoding(
    models: dict[str, nn.Module],
    prompt_len: int = 64,
    new_tokens: int = 512,
    retrievers: dict[str, Retrieve] | None = None,
) -> list[DecodeSpeed]:
    """`decoding_speed` of every named model (RETRO ones with their `retrievers` entry)."""
    rows = []
    for name, model in models.items():
        retrieve = (retrievers or {}).get(name)
        cached, uncached = decoding_speed(model, prompt_len, new_tokens, retrieve=retrieve)
        params = sum(p.numel() for p in model.parameters())
        rows.append(DecodeSpeed(name, params, cached, uncached))
    return rows


def speed_table(rows: list[DecodeSpeed], prompt_len: int, new_tokens: int) -> str:
    """Markdown table of `benchmark_decoding` rows."""
    lines = [
        f"{new_tokens} new tokens after a {prompt_len}-token prompt, batch 1, greedy, "
        f"{torch.get_num_threads()} thread(s)",
        "",
        "| model | params | tokens/s cached | tokens/s full forward | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.params / 1e6:.2f}M | {r.cached:.1f} | {r.uncached:.1f} "
            f"| {r.speedup:.1f}× |"
        )
    return "\n".join(lines)


def smoke_note(overrides: list[str], new_tokens: int) -> str | None:
    """One line where the benchmark runs at smoke sizes (`debug=tiny` models, or fewer than
    SMOKE_TOKENS new tokens), whose cached decoding measured 0.2–0.9× the full forward; None
    at real sizes."""
    small = [o for o in overrides if o.lstrip("+") == "debug=tiny"]
    small += [f"bench_new_tokens={new_tokens}"] if new_tokens < SMOKE_TOKENS else []
    return f"note: {' '.join(small)}: {SMOKE_NOTE}" if small else None
