"""Write a Markdown report with PNG plots for a run folder or a multirun/sweep folder.

The same program as `advarch-report` (installed with the package); see `advarch/cli/report.py`.
"""

from advarch.cli.report import main

if __name__ == "__main__":
    main()
