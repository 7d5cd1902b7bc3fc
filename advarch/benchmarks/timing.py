"""Timing and peak-memory helpers shared by the benchmarks in this package."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Row:
    """One line of the benchmark table."""

    bench: str
    contender: str
    size: str
    ms: float
    peak_mb: float = float("nan")
    ratio: float = float("nan")  # ms / reference ms measured in the same run
    host_ms: float = float("nan")  # GPU: time for the call to return (launch-bound if ≈ ms)


def too_small(what: str) -> str:
    """The words under a table measured at smoke sizes: its `what` mean nothing there."""
    return f"sizes too small for the {what} to mean anything (a smoke run)"


def tiny_overrides(overrides: Sequence[str]) -> list[str]:
    """The `debug=tiny` (smoke sizes) among a command's overrides."""
    return [o for o in overrides if o.lstrip("+") == "debug=tiny"]


SMOKE_NOTE = too_small("timings")


def time_ms(
    fn: Callable[[], object], repeat: int = 5, warmup: int = 1, warmup_s: float = 0.1
) -> float:
    """Median wall time of `fn()` in milliseconds, after `warmup` calls and, where warmup > 0,
    as many more as fill `warmup_s` seconds: a process's first calls (thread pool, allocator,
    kernel choice) ran several times slower, and one warm-up call left the first contender
    measured cold (moe fwd dense 37.8 ms, above its fwd+bwd's 17.7 ms)."""
    start, calls = time.perf_counter(), 0
    while calls < warmup or (warmup and time.perf_counter() - start < warmup_s):
        fn()
        calls += 1
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(fn: Callable[[], object]) -> float:
    """Peak bytes of live tensors allocated while `fn()` runs, in MiB.

    On CPU this replays the profiler's allocation/free events in time order, which counts
    ATen tensor memory (what scales with T) and nothing else.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() / 2**20
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU],
                                            profile_memory=True) as prof:  # fmt: skip
        fn()
    # Raw allocator events: +bytes on allocation, −bytes on free, replayed in time order.
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for evt in events:
        live += evt.nbytes()
        peak = max(peak, live)
    return peak / 2**20


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side prints stage lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
