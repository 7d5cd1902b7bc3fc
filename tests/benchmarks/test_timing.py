"""`advarch.benchmarks.timing`: the clock every CPU suite reads."""

from __future__ import annotations

import time

from advarch.benchmarks.timing import time_ms


def test_time_ms_warms_up_past_a_cold_start() -> None:
    # one warm-up call left a process's first contender measured cold: moe fwd dense 37.8 ms
    # above its fwd+bwd's 17.7 ms
    calls: list[int] = []

    def cold_three_times() -> None:
        calls.append(1)
        if len(calls) <= 3:
            time.sleep(0.02)

    assert time_ms(cold_three_times, repeat=3) < 10
    calls[:] = [1] * 3
    time_ms(cold_three_times, repeat=1, warmup=0)  # (the references' interleaved timings)
    assert len(calls) == 4
