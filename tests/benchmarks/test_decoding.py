"""Decoding benchmark: one row per model with positive rates, RETRO retrieving per chunk."""

from __future__ import annotations

import torch

from advarch.benchmarks.decoding import benchmark_decoding, speed_table
from tests.test_generation import RETRO_M, fake_retrieve, retro_model, small_model


def test_benchmark_rows() -> None:
    models = {"ssm": small_model("ssm").float(), "retro": retro_model("transformer").float()}
    calls: list[torch.Tensor] = []

    def retrieve(chunk: torch.Tensor) -> torch.Tensor:
        calls.append(chunk)
        return fake_retrieve(chunk)

    rows = benchmark_decoding(models, prompt_len=4, new_tokens=6, retrievers={"retro": retrieve})
    assert [r.model for r in rows] == ["ssm", "retro"]
    assert all(r.cached > 0 and r.uncached > 0 and r.prefill > 0 and r.stepped > 0 for r in rows)
    # cached and full runs each retrieve twice (4 + 6 − 1 tokens fed), after their untimed
    # warm-up of 2 tokens retrieved once (4 + 2 − 1)
    assert len(calls) == 2 * (9 // RETRO_M) + 2 * (5 // RETRO_M)
    assert "| ssm |" in speed_table(rows, 4, 6)


def test_smoke_sizes_say_the_timings_mean_nothing() -> None:
    # the README's smoke run (debug=tiny models, 8 new tokens) showed cached decoding at
    # 0.2-0.9x the full forward, with no word of warning
    from advarch.benchmarks.decoding import smoke_note

    note = smoke_note(["debug=tiny"], 8)
    assert note == ("note: debug=tiny bench_new_tokens=8: sizes too small for the timings to "
                    "mean anything (a smoke run)")  # fmt: skip
    assert smoke_note(["model.dim=512"], 512) is None
