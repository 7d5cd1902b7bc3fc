"""`bench.py --device cuda --profile` on CPU at small sizes: per-pass op counts and the tables
of where the MoE and its dense reference spend their time."""

from __future__ import annotations

import re

import pytest
import torch

from advarch.benchmarks import gpu


@pytest.fixture
def small_gpu_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU benchmark's MoE section on CPU, at sizes of a unit test."""
    for name, value in {"DEVICE": "cpu", "DIM": 32, "HIDDEN": 64, "WARMUP": 1,
                        "MOE_CASES": (("swiglu", 512),)}.items():  # fmt: skip
        monkeypatch.setattr(gpu, name, value)


def test_moe_profiles_count_ops_and_table_the_slowest(
    small_gpu_bench: None, capsys: pytest.CaptureFixture
) -> None:
    gpu.print_moe_profiles()
    out = capsys.readouterr().out
    heads = re.findall(r"^== (.+), 512 tokens, swiglu: (\d+) aten ops, 0 kernel launches", out,
                       re.M)  # fmt: skip
    names = ["dense FFN h128", "advarch MoE", "advarch MoE, torch routing + moves"]
    assert [name for name, _ in heads] == names
    dense_ops, moe_ops, plain_ops = (int(n) for _, n in heads)
    assert 10 < dense_ops < moe_ops  # routing, sorting and gathers on top of the experts
    assert moe_ops == plain_ops  # the same torch ops on CPU (Triton's are for CUDA)
    assert out.count("Self CPU time total") == 3  # one host-time table each (no device: CPU)
    # each table's rows are the pass's aten ops (which ones lead is the machine's timing: on a
    # loaded one aten::mm fell out of a table's 12)
    tables = out.split("\n== ")
    assert all(len(re.findall(r"^ *aten::\w+ ", t, re.M)) >= 6 for t in tables), out


def test_op_profile_counts_top_level_ops_once(small_gpu_bench: None) -> None:
    """An op the caller dispatches counts once; the ops it calls inside (linear: t, mm) do not."""
    w, x = torch.randn(8, 8), torch.randn(4, 8)
    head = gpu.op_profile(lambda: torch.nn.functional.linear(x, w).sum(), passes=2)
    assert head.splitlines()[0] == "2 aten ops, 0 kernel launches per pass"
