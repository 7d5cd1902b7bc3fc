"""Decoding benchmark: new tokens per second of each model with its per-layer caches against
the full forward on the whole prefix at every step (`use_cache=False`), greedy, batch 1; and
prompt tokens per second of `Model.prefill` against stepping through the prompt one token at a
time (the decoder's prefill before it had one).

`scripts/generate.py bench=true` prints `speed_table(benchmark_decoding(...))`; the README's
benchmark table quotes it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from advarch.benchmarks.timing import SMOKE_NOTE, tiny_overrides
from advarch.generation import Retrieve, generate
from advarch.models import Model

SMOKE_TOKENS = 64  # fewer new tokens: prefill and per-call overhead outweigh the cache


@dataclass
class DecodeSpeed:
    """Tokens per second of one model with and without the cache, and of its prompt prefill
    in one pass and token by token."""

    model: str
    params: int
    cached: float
    uncached: float
    prefill: float
    stepped: float

    @property
    def speedup(self) -> float:
        return self.cached / self.uncached

    @property
    def prefill_speedup(self) -> float:
        return self.prefill / self.stepped


def _random_prompt(model: nn.Module, prompt_len: int, seed: int) -> torch.Tensor:
    """(1, prompt_len) ids below min(vocabulary, 256), the same for a seed."""
    vocab = model.spec.vocab_size
    return torch.randint(
        0, min(vocab, 256), (1, prompt_len), generator=torch.Generator().manual_seed(seed)
    )


@torch.no_grad()
def prefill_speed(model: Model, prompt_len: int = 64, seed: int = 0) -> tuple[float, float]:
    """(one pass, token by token) prompt tokens per second: `Model.prefill` against
    `init_state` and `Model.step` per prompt token, batch 1, no retrieval; each run once
    untimed first."""
    model.eval()
    prompt = _random_prompt(model, prompt_len, seed).to(next(model.parameters()).device)

    def stepped() -> None:
        state = model.init_state(1)
        for t in range(prompt_len):  # the reference: one step per prompt token
            _, state = model.step(prompt[:, t : t + 1], state)

    rates = []
    for run in (lambda: model.prefill(prompt), stepped):
        run()
        _wait_for(prompt.device)
        start = time.perf_counter()
        run()
        _wait_for(prompt.device)
        rates.append(prompt_len / (time.perf_counter() - start))
    return rates[0], rates[1]


def _wait_for(device: torch.device) -> None:
    """Wait for the work queued on `device`: CUDA runs kernels asynchronously, so a clock read
    at once stops at their launch (a one-pass prefill would look far faster than it is)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    prompt = _random_prompt(model, prompt_len, seed)
    device = next(model.parameters()).device
    for use_cache in (True, False):  # warm-up: first calls pay for kernels, caches, allocations
        generate(model, prompt, 2, greedy=True, use_cache=use_cache, retrieve=retrieve)
    rates = []
    for use_cache in (True, False):
        _wait_for(device)
        start = time.perf_counter()
        out = generate(
            model, prompt, new_tokens, greedy=True, use_cache=use_cache, retrieve=retrieve
        )
        _wait_for(device)
        rates.append((out.shape[1] - prompt_len) / (time.perf_counter() - start))
    return rates[0], rates[1]


def benchmark_decoding(
    models: dict[str, nn.Module],
    prompt_len: int = 64,
    new_tokens: int = 512,
    retrievers: dict[str, Retrieve] | None = None,
) -> list[DecodeSpeed]:
    """`decoding_speed` and `prefill_speed` of every named model (RETRO ones decode with
    their `retrievers` entry)."""
    rows = []
    for name, model in models.items():
        retrieve = (retrievers or {}).get(name)
        cached, uncached = decoding_speed(model, prompt_len, new_tokens, retrieve=retrieve)
        params = sum(p.numel() for p in model.parameters())
        rows.append(DecodeSpeed(name, params, cached, uncached, *prefill_speed(model, prompt_len)))
    return rows


def speed_table(rows: list[DecodeSpeed], prompt_len: int, new_tokens: int) -> str:
    """Markdown table of `benchmark_decoding` rows."""
    lines = [
        f"{new_tokens} new tokens after a {prompt_len}-token prompt, batch 1, greedy, "
        f"{torch.get_num_threads()} thread(s); prompt tokens/s of its prefill in one pass "
        "and token by token (no retrieval)",
        "",
        "| model | params | tokens/s cached | tokens/s full forward | speed-up "
        "| prefill tokens/s | token-loop tokens/s | prefill speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.params / 1e6:.2f}M | {r.cached:.1f} | {r.uncached:.1f} "
            f"| {r.speedup:.1f}× | {r.prefill:.0f} | {r.stepped:.0f} | {r.prefill_speedup:.1f}× |"
        )
    return "\n".join(lines)


def smoke_note(overrides: list[str], new_tokens: int) -> str | None:
    """One line where the benchmark runs at smoke sizes (`debug=tiny` models, or fewer than
    SMOKE_TOKENS new tokens), whose cached decoding measured 0.2–0.9× the full forward; None
    at real sizes."""
    small = tiny_overrides(overrides)
    small += [f"bench_new_tokens={new_tokens}"] if new_tokens < SMOKE_TOKENS else []
    return f"note: {' '.join(small)}: {SMOKE_NOTE}" if small else None
