"""`scripts/bench.py`'s command line: a mistyped suite is one usage line, not a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(("device", "suite"), [("cpu", "mo"), ("cuda", "references")])
def test_unknown_suite_is_one_line_listing_the_suites(device: str, suite: str) -> None:
    args = [sys.executable, "scripts/bench.py", "--device", device, "--only", suite]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert f"--only {suite!r} is not a suite on {device} (moe, sliding_window, ssm" in last
