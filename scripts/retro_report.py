"""Does retrieval help? RETRO with its neighbours vs padding neighbours vs the plain decoder.

    python scripts/retro_report.py [--retrofit] [--split val|test] [hydra overrides]
    python scripts/retro_report.py experiment=retro_lookup           # the lookup task

What it trains, evaluates and writes: `advarch/reports/retro.py`.
"""

from advarch.reports.retro import main

if __name__ == "__main__":
    main()
