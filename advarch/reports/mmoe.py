"""MMoE vs one-gate MoE vs shared bottom on the synthetic pair, over task correlations and seeds.

Runs `experiment=mmoe_synthetic` for every (correlation p, model, seed) through
`advarch.train.run` and prints a markdown table of per-task test MSE and the gate cosine,
mean ± std over seeds. Seeds change the initialisation and shuffling (`seed`); the data stays
fixed (`data.seed`, default 0) so a sweep over p changes nothing but the task relationship.
`--data-seeds` redraws the data per seed as well, as the paper does (much noisier at this size).

    python scripts/mmoe_report.py --correlations 0.0 0.5 1.0 --seeds 0 1 2 trainer.max_steps=500

Overrides (key=value) may go anywhere among the options. Each call writes into a folder of its
own, `<out>/<time>_<id>/` (`--out`, default `outputs/mmoe_report`): a run folder per (p, model,
seed) with its CSV curves and last.ckpt, and `mmoe_report.md`, the table printed.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

import numpy as np
import torch

from advarch.benchmarks.timing import tiny_overrides, too_small
from advarch.config.compose import compose_run
from advarch.errors import exit_on_config_error
from advarch.output_folders import exit_if_unmakeable, stamped_folder
from advarch.train import run

MODELS = ("mmoe", "one_gate_moe", "shared_bottom")
METRICS = ("test/task_a/mse", "test/task_b/mse", "test/gate_cosine")
# one line per run: no bars or model tables (nulling the bar callbacks alone would bring back
# Lightning's default ones), no plots, no best-*.ckpt (train.py still writes each last.ckpt)
QUIET = [
    "++trainer.enable_progress_bar=false",
    "++trainer.enable_model_summary=false",
    *(f"callbacks.{name}=null" for name in ("rich_progress_bar", "rich_model_summary",
                                            "expert_load", "model_checkpoint")),
]  # fmt: skip


def grid(
    correlations: list[float],
    models: list[str],
    seeds: list[int],
    root: Path,
    extra: list[str],
    data_seeds: bool = False,
) -> dict[tuple[float, str], np.ndarray]:
    """{(p, model): (seeds, metrics) array} of the METRICS (NaN where a model has no gate)."""
    results = {}
    for p in correlations:
        for model in models:
            rows = []
            for seed in seeds:
                overrides = [
                    "experiment=mmoe_synthetic",
                    f"model={model}",
                    f"data.correlation={p}",
                    f"data.seed={seed if data_seeds else 0}",
                    f"seed={seed}",
                    *QUIET,
                    *extra,
                ]
                metrics = run(compose_run(overrides, root / f"p{p}-{model}-s{seed}"))
                rows.append([metrics.get(k, float("nan")) for k in METRICS])
                print(
                    f"p={p} model={model} seed={seed}: "
                    + ", ".join(
                        f"{k}={v:.4f}"
                        for k, v in zip(METRICS, rows[-1], strict=True)
                        if not math.isnan(v)
                    ),  # (a model without gates has no cosine)
                    flush=True,
                )
            results[(p, model)] = np.array(rows)
    return results


def table(results: dict[tuple[float, str], np.ndarray], seeds: int) -> str:
    """Markdown table: mean ± std (over seeds) of each metric; one seed: its values."""
    lines = [
        f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed (no spread: add --seeds)",
        "",
        "| p | model | task_a test MSE | task_b test MSE | gate cosine |",
        "|---|---|---|---|---|",
    ]
    for (p, model), values in results.items():
        cells = [
            "—" if not np.isfinite(v).all()
            else f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" if len(v) > 1
            else f"{v[0]:.4f}"
            for v in values.T
        ]  # fmt: skip
        lines.append(f"| {p} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, `--out` checked before any run (a file there ended the first run in
    a NotADirectoryError traceback)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--correlations", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data-seeds", action="store_true", help="redraw the data per seed")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/mmoe_report"),
        help="each call writes its run folders and mmoe_report.md into a new folder "
        "<out>/<time>_<id>/ (default: %(default)s)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. trainer.max_steps=500"
    )
    # overrides (key=value) anywhere: taken out before argparse, as moved to the end the last
    # list option swallowed them (`--models mmoe trainer.max_steps=2`: an invalid model)
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = [*overrides, *args.overrides]
    exit_if_unmakeable(args.out)
    return args


def report() -> None:
    """Train every (correlation, model, seed) of the command line and write their table."""
    args = parse(sys.argv[1:])
    torch.set_num_threads(1)
    logging.getLogger("advarch").setLevel(logging.WARNING)
    root = stamped_folder(args.out)
    print(f"mmoe report: writing into {root}", flush=True)
    results = grid(
        args.correlations, args.models, args.seeds, root, args.overrides, args.data_seeds
    )
    text = table(results, len(args.seeds))
    tiny = tiny_overrides(args.overrides)
    if tiny:  # (as the other reports and benchmarks say under their tables at these sizes)
        text += f"\n\nnote: {' '.join(tiny)}: {too_small('test errors')}"
    print(text)
    (root / "mmoe_report.md").write_text(text + "\n")
    print(f"\nwritten to {root / 'mmoe_report.md'}")


def main() -> None:
    """The command line: `report`, a bad config key or value as one `error:` line."""
    exit_on_config_error(report)
