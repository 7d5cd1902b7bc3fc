"""OmegaConf resolvers used in configs/ (registered once on import)."""

from __future__ import annotations

import secrets
from pathlib import Path

from omegaconf import OmegaConf

# the last part of a metric's name (`cl/avg_acc` → `avg_acc`) ends so when higher is better
HIGHER_IS_BETTER = ("acc", "accuracy", "bwt", "fwt", "f1", "auc", "mfu", "_per_s")


def metric_mode(metric: str | None) -> str:
    """`max` for a metric where higher is better (accuracies, transfer, F1, throughput), else
    `min` (losses, bits per byte, perplexity, forgetting, MSE); Lightning's `_epoch` and `_step`
    aggregates (`train/acc_epoch`) as their metric."""
    name = str(metric or "").rsplit("/", 1)[-1].removesuffix("_epoch").removesuffix("_step")
    return "max" if name.endswith(HIGHER_IS_BETTER) else "min"


def sweep_direction(metric: str | None) -> str:
    """`metric_mode` in a sweeper's words: `maximize` or `minimize`."""
    return "maximize" if metric_mode(metric) == "max" else "minimize"


def config_options(group: str) -> str:
    """The packaged options of a config group, comma-separated (`digits, text, …`)."""
    folder = Path(__file__).resolve().parent.parent / "configs" / group
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))


def register_resolvers() -> None:
    """`${unique:}` — a short random id, cached per config, so run folders never collide;
    `${range:a,b}` — [a, a+1, …, b−1], e.g. RETRO's CCA in every layer after the first at any
    depth: `cca_layers: ${range:1,${model.depth}}`; `${metric_mode:m}` and
    `${sweep_direction:m}` — whether higher or lower values of metric m are better;
    `${config_options:g}` — the options of config group g (a `--help` lists them)."""
    if not OmegaConf.has_resolver("unique"):
        OmegaConf.register_new_resolver("unique", lambda: secrets.token_hex(3), use_cache=True)
    if not OmegaConf.has_resolver("range"):
        OmegaConf.register_new_resolver("range", lambda a, b: list(range(int(a), int(b))))
    for name, resolve in (
        ("metric_mode", metric_mode),
        ("sweep_direction", sweep_direction),
        ("config_options", config_options),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolve)


register_resolvers()
