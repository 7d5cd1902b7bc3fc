"""Benchmark advarch's fast blocks against their references, measured in the same run.

Usage: python scripts/bench.py [--only moe,sliding_window,ssm] [--quick]
"""

from __future__ import annotations

import argparse
import importlib

import torch

from advarch.benchmarks.timing import Row

SUITES = ("moe", "sliding_window", "ssm")


def print_table(rows: list[Row]) -> None:
    header = (
        f"| {'bench':<16}| {'contender':<28}| {'size':<14}| {'ms':>10} | {'peak MiB':>9} "
        f"| {'× ref':>7} |"
    )
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(
            f"| {r.bench:<16}| {r.contender:<28}| {r.size:<14}| {r.ms:>10.1f} | "
            f"{r.peak_mb:>9.1f} | {r.ratio:>7.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(SUITES), help="comma-separated suites")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
        f"{'cuda' if torch.cuda.is_available() else 'cpu'}"
    )
    rows: list[Row] = []
    for name in args.only.split(","):
        suite = importlib.import_module(f"advarch.benchmarks.{name}")
        rows += suite.run(quick=args.quick)
    print_table(rows)


if __name__ == "__main__":
    main()
