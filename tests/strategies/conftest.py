"""Helpers shared by the strategy tests: fast trainer overrides and the model configs that fit."""

from __future__ import annotations

import functools

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from advarch.config.compose import CONFIG_DIR
from tests.conftest import ROOT

FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "++trainer.limit_val_batches=2",
    "++trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.rich_progress_bar=null",
]
SIZES = {"dim": 32, "depth": 2, "num_heads": 2, "ffn_hidden": 64}


@functools.cache
def composed_model(name: str) -> DictConfig:
    """`configs/model/<name>.yaml` with its defaults list resolved."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    GlobalHydra.instance().clear()
    return cfg.model


def fitting_models() -> list[str]:
    """Model configs usable on feature-vector classification/regression data (no RETRO, no
    encoder–decoder)."""
    names = sorted(p.stem for p in (ROOT / "advarch" / "configs" / "model").glob("*.yaml"))
    return [n for n in names if not (composed_model(n).get("retro")
                                     or composed_model(n).get("encoder_depth"))]  # fmt: skip


def model_overrides(name: str) -> list[str]:
    """Shrink a model config for a few-step run (only the size keys it has)."""
    cfg = composed_model(name)
    return [f"model.{k}={v}" for k, v in SIZES.items() if k in cfg]
