"""Reports of finished runs and sweeps: PNG plots and a Markdown summary from the run folders.

A run folder (`outputs/runs/<name>/<time>/`) holds Lightning's CSV log
`csv/version_*/metrics.csv` (one row per logging call, empty cells for metrics not logged in
that row), and optionally `plots/expert_load_history.npz` (MoE; `advarch/callbacks/
expert_load.py`) and `continual/accuracy_matrix.csv` or `bpb_matrix.csv` (continual
strategies). A sweep folder (`outputs/multiruns/<name>/<time>/`) holds one run per numbered
subfolder with its `.hydra/overrides.yaml`, and `optimization_results.yaml` after an Optuna
sweep.

- `run_folders`: reading them (metrics, task matrices, overrides, saved settings).
- `figures`: the PNGs (learning curves, expert load over training, few-shot accuracy, sweep
  curves).
- `markdown`: `write_report(folder)` → `<folder>/report/report.md` with those PNGs, the
  continual accuracy matrix with ACC/BWT/forgetting (GEM eq. 2–3, Chaudhry et al. 2018), and
  for a sweep a table of overrides → final metrics with the best configuration marked (plus
  a report per run). `advarch-report` (`advarch/cli/report.py`) is its command line.
"""
