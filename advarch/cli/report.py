"""Write a Markdown report with PNG plots for a run folder or a multirun/sweep folder.

    python scripts/report.py outputs/runs/<name>/<time>
    python scripts/report.py outputs/multiruns/<time> [--wandb]

Writes `<folder>/report/report.md`; the logic lives in `advarch.reports`.
"""

from __future__ import annotations

import argparse
import sys


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("folder", help="a run folder (csv/version_*/metrics.csv) or a sweep folder")
    parser.add_argument(
        "--wandb", action="store_true", help="also log the images to an offline W&B run there"
    )
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    from advarch.reports.markdown import write_report
    from advarch.tracking import sync_hint

    try:
        path = write_report(args.folder, wandb=args.wandb)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(f"report: {path}")
    hint = sync_hint(path.parent)
    if args.wandb and hint:
        print(hint)


if __name__ == "__main__":
    main()
