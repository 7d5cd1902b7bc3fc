"""Checks of the run-level keys: `train.yaml`'s own keys, the trainer, callbacks and loggers.

Together with `pipeline.validate` (data, model, strategy and block options) this runs before
the run folder is used and before any data is read, so every bad key is one line naming it.
Types come from the `_target_`'s signature (`validate_node`); the ranges below are the ones
Lightning or torch would only reject (or silently accept) after work had started.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from omegaconf import DictConfig, OmegaConf

from advarch.config.validate import validate_node
from advarch.errors import ConfigError
from advarch.typecheck import quote_hint

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
# key: (smallest allowed value, allowed exceptions below it, what the key means)
TRAINER_MINIMA: dict[str, tuple[float, tuple[Any, ...], str]] = {
    "max_steps": (1, (-1,), "optimizer steps (-1: until max_epochs)"),
    "max_epochs": (1, (-1, None), "epochs (-1: until max_steps)"),
    "min_steps": (0, (None,), "optimizer steps"),
    "min_epochs": (0, (None,), "epochs"),
    "accumulate_grad_batches": (1, (), "batches per optimizer step"),
    "log_every_n_steps": (1, (), "steps between logged points"),
    "check_val_every_n_epoch": (1, (None,), "epochs between validations"),
    "num_sanity_val_steps": (0, (-1, None), "batches (-1: all)"),
    "gradient_clip_val": (0, (None,), "a gradient norm"),
    "reload_dataloaders_every_n_epochs": (0, (), "epochs"),
}

# optimizer key (any optimizer's, by that name): (whether a value is allowed, the allowed values
# in words). torch.optim takes momentum=1.5 (steps grow without bound) and dampening=1 (no new
# gradient enters the momentum) without a word, and names neither betas nor weight_decay.
OPTIMIZER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: v > 0, "a positive number"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "dampening": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "betas": (lambda v: 0 <= v < 1, "in [0, 1) each"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
}


def check_run_keys(cfg: DictConfig) -> None:
    """`seed`, `train`, `test`, `tags`, `run_name`, `ckpt_path`, `optimized_metric` of
    train.yaml."""
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed!r} must be an integer in 0..2**32-1")
    for key in ("train", "test"):
        if key in cfg and not isinstance(cfg[key], bool):
            raise ConfigError(f"{key}={cfg[key]!r} must be true or false")
    if not cfg.get("train", True) and not cfg.get("test", True):
        raise ConfigError("train=false and test=false: nothing to do")
    for key in ("run_name", "ckpt_path", "optimized_metric"):
        value = cfg.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{key}={value!r} must be a non-empty string{quote_hint(key, value)}")
    for key in ("tags", "logger.wandb.tags"):  # a word became a W&B tag per letter
        tags = OmegaConf.select(cfg, key)
        if tags is not None and not OmegaConf.is_list(tags):
            raise ConfigError(f"{key}={tags!r} must be a list: {key}=[{tags}] (or {key}=[a,b])")
    name = PurePath(str(cfg.get("run_name") or ""))
    if name.is_absolute() or ".." in name.parts:  # its runs go to outputs/runs/<run_name>/
        raise ConfigError(
            f"run_name={str(name)!r} must stay inside outputs/runs (no '..', no '/' first)"
        )


def check_trainer(node: DictConfig) -> None:
    """Types of every `trainer.*` key (Lightning's signature), ranges, devices vs hardware."""
    validate_node(node, "trainer", skip=("callbacks", "logger", "default_root_dir"))
    cfg = OmegaConf.to_container(node, resolve=True)
    for key, (low, allowed, meaning) in TRAINER_MINIMA.items():
        value = cfg.get(key)
        if (
            key in cfg
            and value not in allowed
            and not (isinstance(value, int | float) and value >= low)
        ):
            extra = " or " + ", ".join(map(str, allowed)) if allowed else ""
            raise ConfigError(f"trainer.{key}={value!r} must be >= {low}{extra} ({meaning})")
    _check_interval(cfg.get("val_check_interval"))
    _check_fraction_per_epoch(cfg)
    _check_interval_fits_epoch(cfg)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        check_batch_limit(cfg.get(key), f"trainer.{key}")
    _check_devices(cfg.get("accelerator", "auto"), cfg.get("devices", "auto"))
    _check_strategy(cfg.get("strategy", "auto"))
    _check_precision(cfg.get("precision"), cfg.get("accelerator", "auto"))


def check_batch_limit(value: Any, key: str) -> None:
    """A batch limit is a count (>= 0), a fraction of the loader in [0, 1], or null."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is not None and not (number and value >= 0 and (isinstance(value, int) or value <= 1)):
        raise ConfigError(f"{key}={value!r} must be a count of batches (>= 0) or a fraction "
                          "in [0, 1]")  # fmt: skip


def _check_interval(value: Any) -> None:
    if value is None or isinstance(value, str | dict):
        return
    if isinstance(value, float) and not 0 < value <= 1:
        raise ConfigError(
            f"trainer.val_check_interval={value!r} must be in (0, 1] as a fraction of an "
            "epoch, or a number of batches >= 1"
        )
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"trainer.val_check_interval={value!r} must be >= 1 batches")


def _check_fraction_per_epoch(cfg: dict[str, Any]) -> None:
    """A fraction of an epoch needs validation per epoch (Lightning: its raw sentence)."""
    value = cfg.get("val_check_interval")
    if isinstance(value, float) and cfg.get("check_val_every_n_epoch") is None:
        raise ConfigError(
            f"trainer.val_check_interval={value} is a fraction of an epoch, which needs "
            "trainer.check_val_every_n_epoch=1 (validation per epoch; it is null: every N "
            "batches across epochs)"
        )


def _check_interval_fits_epoch(cfg: dict[str, Any]) -> None:
    """Validating per epoch, a batch interval must fit in the epoch's batch limit (Lightning
    says so only once the data is built, in a traceback)."""
    interval, limit = cfg.get("val_check_interval"), cfg.get("limit_train_batches")
    counts = all(isinstance(v, int) and not isinstance(v, bool) for v in (interval, limit))
    if counts and cfg.get("check_val_every_n_epoch", 1) is not None and interval > limit:
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be <= trainer.limit_train_batches="
            f"{limit} (the batches of an epoch; validation runs per epoch, "
            "trainer.check_val_every_n_epoch), or trainer.check_val_every_n_epoch=null"
        )


def check_accelerator(accelerator: Any, key: str = "trainer.accelerator",
                      cpu: str = "trainer=cpu or trainer.accelerator=cpu") -> None:  # fmt: skip
    """One line for an accelerator that is not one, or that this machine lacks (Lightning
    says so in a traceback once the trainer is built); `cpu`: how to ask for the CPU."""
    import importlib.util

    import torch

    if isinstance(accelerator, str) and accelerator not in ACCELERATORS:
        raise ConfigError(f"{key}={accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    lacks = {
        "gpu": "no CUDA GPU" if torch.cuda.device_count() == 0 else None,
        "mps": None if torch.backends.mps.is_available() else "no Apple GPU (MPS)",
        "tpu": "no TPU (torch_xla)" if importlib.util.find_spec("torch_xla") is None else None,
    }
    lack = lacks.get("gpu" if accelerator == "cuda" else accelerator)
    if lack:
        raise ConfigError(f"{key}={accelerator} but this machine has {lack} (use {cpu})")


def _check_devices(accelerator: Any, devices: Any) -> None:
    import torch

    check_accelerator(accelerator)
    if isinstance(devices, str) and devices != "auto":
        try:
            devices = int(devices)
        except ValueError:
            raise ConfigError(
                f"trainer.devices={devices!r} must be a count, a list of ids or 'auto'"
            ) from None
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        raise ConfigError(f"trainer.devices={devices} must be >= 1 (or -1 / 'auto': all)")
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        wanted = len(devices) if isinstance(devices, list) else devices
        if isinstance(wanted, int) and wanted > available:
            raise ConfigError(f"trainer.devices={devices} but this machine has {available} GPUs")
    if accelerator == "cpu" and isinstance(devices, int) and devices > (os.cpu_count() or 1):
        raise ConfigError(
            f"trainer.devices={devices} CPU processes exceed this machine's {os.cpu_count()} cores"
        )


def _check_precision(precision: Any, accelerator: Any) -> None:
    """16-bit weights (`bf16-true`, `16-true`): Lightning casts the whole module, so running
    metrics and statistics sum in 16 bits too (an epoch's mean stops counting after ~256
    batches: train/loss_epoch 4.0 for a mean of 3.0), as do optimizer updates and RoPE's
    frequencies; advarch trains 16-bit compute with 32-bit weights (`*-mixed`). float16 on a
    CPU: Lightning's two raw warnings, then bfloat16 in its place."""
    import torch

    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.device_count())
    if str(precision) in ("16", "16-mixed") and on_cpu and not torch.backends.mps.is_available():
        raise ConfigError(
            f"trainer.precision={precision} (float16 mixed precision) needs a CUDA GPU; on a "
            "CPU use trainer.precision=bf16-mixed (or 32)"
        )
    if str(precision) in ("bf16-true", "16-true"):
        mixed = "16-mixed" if str(precision).startswith("16") else "bf16-mixed"
        raise ConfigError(
            f"trainer.precision={precision} keeps weights, optimizer states and running metrics "
            f"in 16 bits (epoch means stop counting after ~256 batches); use {mixed} (16-bit "
            "compute, 32-bit weights)"
        )


def _check_strategy(strategy: Any) -> None:
    if not isinstance(strategy, str) or strategy == "auto":
        return
    from lightning.pytorch.strategies import StrategyRegistry

    known = StrategyRegistry.available_strategies()
    if strategy not in known and strategy not in ("ddp", "ddp_spawn", "fsdp", "deepspeed"):
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not a Lightning strategy "
            "(e.g. auto, ddp, ddp_spawn, fsdp)"
        )


def check_optimizer(node: DictConfig) -> None:
    """The `OPTIMIZER_RANGES` of the `optimizer.*` keys the config has."""
    cfg = OmegaConf.to_container(node, resolve=True)
    for key, (allowed, words) in OPTIMIZER_RANGES.items():
        if key not in cfg:
            continue
        value = cfg[key]
        values = value if key == "betas" and isinstance(value, list) else [value]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if not (numbers and all(allowed(v) for v in values)):
            raise ConfigError(f"optimizer.{key}={value!r} must be {words}")


def check_collection(node: DictConfig | None, group: str) -> None:
    """Every `_target_` entry of `callbacks` / `logger` against its constructor's signature."""
    if node is None:
        return
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{group} must be a mapping of named entries, got {node!r}")
    for name, entry in node.items():
        # entries without `_target_` are settings for an entry another option removed (e.g.
        # debug=tiny's checkpoint cadence under callbacks=none): nothing is built from them
        if isinstance(entry, DictConfig) and "_target_" in entry:
            validate_node(entry, f"{group}.{name}")
