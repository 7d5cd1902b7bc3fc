"""MMoE vs one-gate MoE vs shared bottom on the synthetic pair, over task correlations and seeds.

    python scripts/mmoe_report.py --correlations 0.0 0.5 1.0 --seeds 0 1 2 trainer.max_steps=500

Options and what it writes: `advarch/reports/mmoe.py`.
"""

from advarch.reports.mmoe import main

if __name__ == "__main__":
    main()
