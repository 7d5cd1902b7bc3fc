"""`scripts/gpu_check.sh` runs, on the GPU, the tests of every CUDA fast path: each test file
that checks a Triton kernel or FlexAttention on CUDA against its reference is in its `tests`
step (the GPU session is the only place these CUDA branches are ever checked)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_cuda_fast_path_test_file():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    listed = set(re.findall(r"tests/models/blocks/(test_\w+\.py)", script))
    blocks = ROOT / "tests" / "models" / "blocks"
    # the kernels' interpreter/CUDA tests; test_triton_sm90.py compiles ahead of time (no GPU)
    fast_paths = {p.name for p in blocks.glob("test_*triton*.py")} - {"test_triton_sm90.py"}
    fast_paths |= {"test_flex_window.py"}
    assert fast_paths - listed == set()
