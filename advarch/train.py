"""Training entry point: compose → validate → build → fit → test → summarise.

`run(cfg)` does the work and returns the metrics; `main` is the Hydra wrapper (the
`advarch-train` console script and `train.py` at the repository root call it).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import advarch.config.resolvers  # noqa: F401  (registers ${unique:})
from advarch.config.compose import CONFIG_DIR

log = logging.getLogger("advarch")


def run(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; returns the final metrics (floats)."""
    import lightning as L
    import torch

    from advarch.config.runs import WANDB_ID_FILE, previous_wandb_id, resolve_checkpoint
    from advarch.pipeline import build_all, instantiate_dict
    from advarch.reporting import print_config_tree, print_summary

    quiet_lightning_logs()
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), Path(cfg.paths.runs_dir))
    echo = cfg.get("extras", {}).get("print_config", True)  # the file is always written
    print_config_tree(cfg, output_dir / "config_tree.txt", echo=echo)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    datamodule, spec, module = build_all(cfg)  # ConfigError on bad input, before any work

    if "wandb" in (cfg.get("logger") or {}):
        wandb_id = previous_wandb_id(ckpt) or cfg.logger.wandb.get("id")
        cfg.logger.wandb.id = wandb_id
    loggers = instantiate_dict(cfg.get("logger"))
    callbacks = instantiate_dict(cfg.get("callbacks"))
    # datamodules whose train loader changes with the epoch (continual streams, curricula)
    trainer_overrides: dict[str, Any] = getattr(datamodule, "trainer_overrides", {})
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(output_dir),
        **trainer_overrides,
    )
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            (output_dir / WANDB_ID_FILE).write_text(logger.experiment.id)
    metrics: dict[str, float] = {}
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
            last = output_dir / "checkpoints" / "last.ckpt"
            trainer.save_checkpoint(last)  # the final state, whatever the checkpoint cadence
            metrics.update(scalar_metrics(trainer))
            if (
                getattr(module, "validated_at_step", None) != trainer.global_step
                and not trainer.fast_dev_run
            ):  # the last validation predates the final weights: validate them
                trainer.validate(module, datamodule=datamodule, verbose=False)
                metrics.update(scalar_metrics(trainer))  # (validate resets the others)
        if cfg.get("test", True):
            results = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update({k: float(v) for r in results for k, v in r.items()})
    finally:
        _finish_wandb()
    print_summary(cfg, spec, metrics, output_dir)
    return metrics


def scalar_metrics(trainer: Any) -> dict[str, float]:
    """The trainer's current scalar callback metrics as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


class _DropNoise(logging.Filter):
    """Lightning's advertising tips and its `weights_only` notice are noise in a research log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Tip:" not in message and "`weights_only` was not set" not in message


_NOISE = _DropNoise()


def quiet_lightning_logs() -> None:
    """Route Lightning's logs through Hydra's handlers once (it adds its own console handler)."""
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # logger filters do not apply to records propagated from children: filter at the source
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        logging.getLogger(name).addFilter(_NOISE)  # a no-op when already there


def _finish_wandb() -> None:
    """Close the W&B run (also after failures and between multirun jobs)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns `cfg.optimized_metric` for sweepers.

    In a multirun, a failed trial (an exception, or a NaN metric) is logged and re-raised as
    that job's result: Hydra records it and the Optuna sweeper marks the trial FAIL and goes on
    (`hydra.sweeper.max_failure_rate`). A single run turns bad input and divergence into one
    `error: …` line.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from advarch.config.validate import ConfigError

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        metrics = run(cfg)
        value = _optimized_value(cfg, metrics)
        if multirun and value is not None and not math.isfinite(value):
            raise FloatingPointError(f"optimized_metric={cfg.optimized_metric} is {value}")
        return value
    except (ConfigError, FloatingPointError) as err:
        if multirun:
            log.error("trial failed: %s", err)
            raise
        sys.exit(f"error: {err}")
    except Exception:
        if multirun:
            log.exception("trial failed")
        raise


def _optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    if metric not in metrics:
        log.warning(
            "optimized_metric=%s was not logged; known: %s", metric, ", ".join(sorted(metrics))
        )
        return math.nan
    return metrics[metric]


if __name__ == "__main__":
    main()
