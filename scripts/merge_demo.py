"""Model merging on digit tasks: one fine-tune per task, merged by every method over a λ sweep.

    python scripts/merge_demo.py                      # 5 pair tasks, ~50 s on 2 shared CPU cores

Options, measured numbers and the method: `advarch/demos/merge_digits.py`.
"""

from advarch.demos.merge_digits import main

if __name__ == "__main__":
    main()
