"""`scripts/bench.py`'s command line: a mistyped suite is one usage line, not a traceback."""

from __future__ import annotations

import pytest

from tests.cli import run_python
from tests.conftest import ROOT


@pytest.mark.parametrize(("device", "suite"), [("cpu", "mo"), ("cuda", "references")])
def test_unknown_suite_is_one_line_listing_the_suites(device: str, suite: str) -> None:
    out = run_python(["scripts/bench.py", "--device", device, "--only", suite], cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert f"--only {suite!r} is not a suite on {device} (moe, sliding_window, ssm" in last


def test_table_leaves_out_columns_nothing_measured(capsys) -> None:
    import runpy

    from advarch.benchmarks.timing import Row

    print_table = runpy.run_path(str(ROOT / "scripts" / "bench.py"))["print_table"]
    print_table([Row("moe", "advarch MoE", "1024 tok", 79.3, ratio=1.0)])  # no peak: no "nan"
    header, _, row = capsys.readouterr().out.splitlines()
    assert "peak MiB" not in header and "host ms" not in header and "nan" not in row
    assert row.split("|")[-2].strip() == "1.00"


def test_table_marks_a_row_not_measured_with_a_dash(capsys) -> None:
    # the naive per-token MoE rows printed "nan" under peak MiB
    import runpy

    from advarch.benchmarks.timing import Row

    print_table = runpy.run_path(str(ROOT / "scripts" / "bench.py"))["print_table"]
    print_table([Row("moe", "dense", "N=512", 2.0, peak_mb=3.5, ratio=1.0),
                 Row("moe", "naive per-token", "N=512", 9.0, ratio=4.5)])  # fmt: skip
    measured, unmeasured = capsys.readouterr().out.splitlines()[2:]
    assert measured.split("|")[5].strip() == "3.5" and unmeasured.split("|")[5].strip() == "—"
    assert "nan" not in unmeasured


def test_quick_says_its_timings_mean_nothing(monkeypatch, capsys) -> None:
    # smoke sizes showed fwd 37.8 ms above fwd+bwd 17.7 ms, with no word of warning
    import runpy

    from advarch.benchmarks import moe
    from advarch.benchmarks.timing import Row

    monkeypatch.setattr(moe, "run", lambda quick: [Row("moe fwd", "dense", "N=512", 1.0)])
    monkeypatch.setattr("sys.argv", ["bench.py", "--quick", "--only", "moe"])
    runpy.run_path(str(ROOT / "scripts" / "bench.py"), run_name="__main__")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "--quick: sizes too small for the timings to mean anything (a smoke run)"


def test_cuda_quick_does_not_call_full_size_timings_a_smoke_run(monkeypatch, capsys) -> None:
    # --device cuda ignores --quick (issue 14's sizes always), yet the full-size GPU table was
    # labelled "sizes too small for the timings to mean anything (a smoke run)"
    import runpy

    from advarch.benchmarks import gpu
    from advarch.benchmarks.timing import SMOKE_NOTE, Row

    monkeypatch.setattr(
        gpu, "run", lambda quick, only: [Row("moe fwd+bwd", "advarch MoE", "16384 tok gelu", 3.84)]
    )
    monkeypatch.setattr("sys.argv", ["bench.py", "--device", "cuda", "--quick"])
    try:
        runpy.run_path(str(ROOT / "scripts" / "bench.py"), run_name="__main__")
    except SystemExit as stop:  # refusing --quick on cuda (a usage line) is fine too
        assert stop.code == 2
        return
    assert SMOKE_NOTE not in capsys.readouterr().out
