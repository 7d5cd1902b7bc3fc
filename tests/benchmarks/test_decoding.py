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
    assert all(r.cached > 0 and r.uncached > 0 for r in rows)
    # cached and full runs each retrieve twice (4 + 6 − 1 tokens fed), after their untimed
    # warm-up of 2 tokens retrieved once (4 + 2 − 1)
    assert len(calls) == 2 * (9 // RETRO_M) + 2 * (5 // RETRO_M)
    assert "| ssm |" in speed_table(rows, 4, 6)
