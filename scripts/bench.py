"""Benchmark advarch's fast blocks against their references, measured in the same run.

usage examples:
  python scripts/bench.py [--only moe,sliding_window,ssm] [--quick]
  python scripts/bench.py --only references     # CPU, beside HF Mixtral, Longformer, mambapy
  python scripts/bench.py --device cuda         # the GPU sizes of advarch.benchmarks.gpu
  python scripts/bench.py --device cuda --profile   # where the GPU MoE spends its time
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import time

import torch

from advarch.benchmarks.timing import SMOKE_NOTE, Row

SUITES = ("moe", "sliding_window", "ssm")  # the default; `references` runs on request
CPU_SUITES = (*SUITES, "references")


def cell(value: float, width: int, digits: int) -> str:
    """`value` right-aligned in `width`, or `—` where that row did not measure it (NaN)."""
    return f"{value:>{width}.{digits}f}" if math.isfinite(value) else f"{'—':>{width}}"


def print_table(rows: list[Row]) -> None:
    """A Markdown table, the text columns as wide as their longest cell; peak memory and host
    ms (GPU runs) only when measured."""
    wide = {
        col: max(len(col), *(len(getattr(r, col)) for r in rows))
        for col in ("bench", "contender", "size")
    }
    host = any(math.isfinite(r.host_ms) for r in rows)
    peak = any(math.isfinite(r.peak_mb) for r in rows)
    numbers = ["        ms", *([" peak MiB"] if peak else []), "  × ref"]
    numbers += [" host ms"] if host else []
    cells = [f"{col:<{n}}" for col, n in wide.items()] + numbers
    print("| " + " | ".join(cells) + " |")
    print("|" + "|".join("-" * (len(c) + 2) for c in cells) + "|")
    for r in rows:
        text = [f"{getattr(r, col):<{n}}" for col, n in wide.items()]
        values = [f"{r.ms:>10.2f}", *([cell(r.peak_mb, 9, 1)] if peak else []), cell(r.ratio, 7, 2)]
        values += [cell(r.host_ms, 8, 2)] if host else []
        print("| " + " | ".join(text + values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default=",".join(SUITES),
        help=f"comma-separated suites: {', '.join(CPU_SUITES)} (cuda: {', '.join(SUITES)})",
    )  # fmt: skip
    parser.add_argument(
        "--quick", action="store_true", help="smaller CPU sizes, for a smoke run (not on cuda)"
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu",
        help="cpu: the suites of --only; cuda: every GPU-sized block with its references",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="with --device cuda: profile the MoE and its dense reference (ops, kernel "
        "launches, top host and device times) instead of timing every block",
    )  # fmt: skip
    args = parser.parse_args()
    if args.profile and args.device != "cuda":
        parser.error("--profile needs --device cuda")
    known = CPU_SUITES if args.device == "cpu" else SUITES
    unknown = [n for n in args.only.split(",") if n not in known]
    if unknown:
        parser.error(f"--only {unknown[0]!r} is not a suite on {args.device} ({', '.join(known)})")
    torch.manual_seed(0)
    if args.device == "cuda":
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        print(f"torch {torch.__version__}, {name}, bf16 autocast, forward + backward")
    else:
        print(
            f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
            f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
        )
    rows: list[Row] = []
    if args.device == "cuda":
        from advarch.benchmarks import gpu

        if args.profile:
            gpu.require_cuda()
            gpu.print_moe_profiles()
            return
        rows += gpu.run(quick=args.quick, only=tuple(args.only.split(",")))
    suites = [] if args.device == "cuda" else args.only.split(",")
    for number, name in enumerate(suites, 1):  # (the table waits for all: say what runs)
        print(f"[{number}/{len(suites)}] {name} …", end="", file=sys.stderr, flush=True)
        start = time.monotonic()
        rows += importlib.import_module(f"advarch.benchmarks.{name}").run(quick=args.quick)
        print(f" done in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
    print_table(rows)
    if args.quick and args.device == "cpu":  # (cuda runs issue 14's sizes whatever it is told)
        print(f"--quick: {SMOKE_NOTE}")
    if args.device == "cuda":
        gpu.print_target_checks(rows)


if __name__ == "__main__":
    main()
