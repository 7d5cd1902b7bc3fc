"""What identifies a run on an experiment tracker: config, group, name, tags, job type.

W&B runs of one team are compared in a table, so each run carries the whole resolved config
(nested, filterable as `model.dim`, `strategy.ewc_lambda`, `seed` …), its parameter counts,
the code version (git commit + dirty flag) and a fingerprint of its data; runs of one sweep or
experiment share a `group`, and every trial of a sweep has a readable name of its own.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

import advarch

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_KEYS_WITHOUT_EFFECT = ("cache_dir", "num_workers", "batch_size", "pin_memory")


@dataclass(frozen=True)
class RunIdentity:
    """Where a run stands among others: filled at the edge (train.py) from Hydra's runtime."""

    run_name: str
    job_type: str = "train"  # train | eval | sweep (a trial of a multirun)
    group: str | None = None  # the experiment or the sweep
    trial: str = ""  # a sweep trial's own overrides, e.g. "model.depth=2 optimizer.lr=0.001"
    choices: dict[str, str] = field(default_factory=dict)  # config group → chosen option
    number: int | None = None  # a sweep trial's number (its folder's name)

    @property
    def name(self) -> str:
        return f"{self.run_name} {self.trial}".strip()

    @property
    def label(self) -> str | None:
        """How a sweep trial's console output names it (`trial 1 (model.depth=2)`): a parallel
        sweep's trials print to one console at once. None for a single run."""
        if self.job_type != "sweep" or self.number is None:
            return None
        return f"trial {self.number}" + (f" ({self.trial})" if self.trial else "")

    @property
    def tags(self) -> list[str]:
        return [
            f"{g}:{self.choices[g]}" for g in ("model", "strategy", "data") if g in self.choices
        ]


def tracker_group(run_name: str, experiment: str | None = None, sweep: str | None = None) -> str:
    """A run's W&B group: its sweep's (`<run_name>-sweep-<sweep folder>`), else its
    experiment, else its run name."""
    if sweep:
        return f"{run_name}-sweep-{sweep}"
    return experiment or run_name


def git_state() -> dict[str, Any]:
    """The commit advarch runs from and whether its tree has uncommitted changes (else {})."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {}  # an installed wheel has no repository


def data_fingerprint(data_cfg: DictConfig | dict) -> str:
    """A short hash of the data options that decide which examples a run sees."""
    data = (
        data_cfg if isinstance(data_cfg, dict) else OmegaConf.to_container(data_cfg, resolve=True)
    )
    kept = {k: v for k, v in data.items() if k not in DATA_KEYS_WITHOUT_EFFECT}
    return hashlib.sha1(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tracker_config(cfg: DictConfig, params: dict[str, int]) -> dict[str, Any]:
    """The resolved run config plus parameter counts, code version (git state and package
    version) and data fingerprint."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config["params"] = {k.split("/")[-1]: v for k, v in params.items()}
    config["git"] = git_state()  # {} for an installed package: its version says which code
    config["advarch_version"] = advarch.__version__
    config["data_fingerprint"] = data_fingerprint(config.get("data") or {})
    return config


def wandb_init_fields(
    cfg: DictConfig, identity: RunIdentity, config: dict[str, Any]
) -> dict[str, Any]:
    """Keyword arguments for `WandbLogger` (passed on to `wandb.init`); `config` is the run's
    `tracker_config`.

    A value the user set under `logger.wandb` (name, group, job_type) wins; `tags` are the
    user's top-level `tags` plus `model:…`, `strategy:…`, `data:…`.
    """
    import wandb

    user = cfg.logger.wandb
    return {
        "name": user.get("name") or identity.name,
        "group": user.get("group") or identity.group,
        "job_type": user.get("job_type") or identity.job_type,
        "tags": list(dict.fromkeys([*map(str, cfg.get("tags") or []), *identity.tags])),
        "config": config,
        # our run summary replaces W&B's console sparklines and sync hints
        "settings": wandb.Settings(quiet=True, silent=True),
    }


def define_summary(experiment: Any, optimized_metric: str | None, mode: str) -> None:
    """Keep the best value of the optimized metric in the W&B summary (not only the last);
    a continual stream's `cl/*` keeps its last: each value averages over the tasks seen so
    far, so earlier values are not comparable."""
    if optimized_metric and not optimized_metric.startswith("cl/"):
        experiment.define_metric(optimized_metric, summary="min" if mode == "min" else "max")


def sync_hint(folder: Path) -> str | None:
    """`sync to W&B later: wandb sync <run>` for the newest offline W&B run in `folder/wandb`
    (runs are named by their start time and end in their id), or None where there is none.
    A resumed run's parts (the same id in the folders of its run name, or a sweep trial's in
    its earlier sweeps' folders; a kill -9'd part that printed nothing among them) are named
    together in the order they ran: wandb has no offline resume (README: Resuming)."""
    runs = sorted((folder / "wandb").glob("offline-run-*"))
    if not runs:
        return None
    run_id = runs[-1].name.rsplit("-", 1)[-1]
    pattern = f"wandb/offline-run-*-{run_id}"
    found = []
    if folder.name.isdigit():  # a sweep trial's folder (`hydra.sweep.subdir`): earlier sweeps'
        found += folder.parent.parent.glob(f"*/*/{pattern}")
    found += folder.parent.glob(f"*/{pattern}")
    unique: dict[str, Path] = {}  # one path a part (a folder linked in holds the same): its own
    for part in sorted(found, key=lambda p: (p.resolve() != p.absolute(), str(p))):
        unique.setdefault(part.name, part)
    parts = sorted(unique.values(), key=lambda p: p.name)  # (named by their start time)
    if len(parts) > 1:
        return f"sync to W&B later: wandb sync --id {run_id} {' '.join(map(str, parts))}"
    return f"sync to W&B later: wandb sync {runs[-1]}"


def finish_wandb() -> None:
    """Close the W&B run (also after failures and between multirun jobs)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
