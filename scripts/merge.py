"""Merge checkpoints (task arithmetic, TIES, DARE, SLERP, linear) into one checkpoint.

The same program as `advarch-merge` (installed with the package); see `advarch/cli/merge.py`.
"""

from advarch.cli.merge import main

if __name__ == "__main__":
    main()
