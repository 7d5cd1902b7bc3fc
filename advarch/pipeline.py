"""Building the pieces of a run from a composed config: datamodule → spec → model → strategy.

Shared by training, evaluation and the scripts, so a checkpoint's saved config rebuilds
exactly the module that wrote it.
"""

from __future__ import annotations

import logging
import re
from fnmatch import fnmatchcase
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from advarch.checkpoint import MOVED_STRATEGY_KEYS
from advarch.config.checks import check_collection, check_optimizer, check_run_keys, check_trainer
from advarch.config.validate import locate_target, unimportable_target, validate_node
from advarch.errors import ConfigError
from advarch.models.model import Model
from advarch.reasons import first_line
from advarch.spec import DataSpec
from advarch.strategies.base import BaseStrategy

log = logging.getLogger("advarch")

BAD_INPUT = (ValueError, TypeError, FileNotFoundError, ConnectionError)
SUPPLIED_TO = {  # arguments the code passes, not the config
    "model": ("spec", "compile"),
    "strategy": ("model", "spec", "optimizer", "scheduler"),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "total_steps"),
}


def validate(cfg: DictConfig) -> None:
    """One-line ConfigError for unknown keys or wrong types in data, model, strategy,
    optimizer and scheduler (the last two optional: a checkpoint from before they existed)."""
    for name, group in MOVED_STRATEGY_KEYS.items():
        if cfg.get("strategy") and name in cfg.strategy:
            raise ConfigError(
                f"strategy.{name} is now {group}.{name} (e.g. {group}.{name}="
                f"{OmegaConf.select(cfg, f'strategy.{name}')})"
            )
    groups = ["data", "model", "strategy"] + [g for g in ("optimizer", "scheduler") if g in cfg]
    for group in groups:
        if group not in cfg or cfg[group] is None:
            raise ConfigError(f"{group} is not set; choose one with {group}=<name>")
        if "_target_" not in cfg[group]:
            raise ConfigError(f"{group}._target_ is missing")
        validate_node(cfg[group], group, SUPPLIED_TO.get(group, ()))
    check_model_options(cfg.model)


def check_model_options(node: DictConfig) -> None:
    """Model's own checks (`Model.check_options`: ranges, cross-field, the typed block configs)
    on `model.*`, before anything is built; other model classes check in their constructor."""
    model_class = locate_target(node._target_, "model")
    if isinstance(model_class, type) and issubclass(model_class, Model):  # factories check later
        options = OmegaConf.to_container(node, resolve=True)
        options = {k: v for k, v in options.items() if not k.startswith("_") and k != "compile"}
        try:
            model_class.check_options(**options)
        except ValueError as err:
            raise ConfigError(str(err)) from err


def validate_run(cfg: DictConfig) -> None:
    """Everything a training run reads: train.yaml's keys, trainer, callbacks, loggers, then
    data, model and strategy (`validate`) and the optimizer's ranges (`check_optimizer`). One
    ConfigError line naming the first bad key."""
    check_run_keys(cfg)
    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer)
    check_collection(cfg.get("callbacks"), "callbacks")
    check_collection(cfg.get("logger"), "logger")
    validate(cfg)
    if cfg.get("optimizer") is not None:  # (training only: eval.py builds no optimizer)
        check_optimizer(cfg.optimizer)


def build_datamodule(cfg: DictConfig) -> tuple[L.LightningDataModule, DataSpec]:
    """The datamodule of `cfg.data` and its spec; bad options or missing files as one
    ConfigError line (`data.files='x/*.txt' matches no file`)."""
    try:
        datamodule = instantiate(cfg.data, _convert_="all")
    except InstantiationException as err:
        cause = err.__cause__ or err
        if not isinstance(cause, BAD_INPUT):
            raise
        raise ConfigError(naming("data", cause)) from cause
    return datamodule, datamodule.spec


def build_model(cfg: DictConfig, spec: DataSpec) -> nn.Module:
    """The model of `cfg.model`; `model.compile=true` compiles its forward in place
    (`nn.Module.compile`: parameter names and checkpoints stay those of the plain model)."""
    options = OmegaConf.to_container(cfg.model, resolve=True)
    compile_model = options.pop("compile", False)
    if not isinstance(compile_model, bool):
        raise ConfigError(f"model.compile={compile_model!r} must be true or false")
    try:
        model = instantiate(options, _partial_=True, _convert_="all")(spec=spec)
    except InstantiationException as err:  # (with _partial_: only locating the class fails)
        raise unimportable_target(options.get("_target_"), "model", err) from err
    except (ValueError, TypeError) as err:  # a constructor's complaint (your own model's too)
        raise ConfigError(naming("model", err)) from err
    for note in model.reach_notes() if isinstance(model, Model) else ():
        log.warning(note)
    if compile_model:
        model.compile()
    return model


def build_optimization(cfg: DictConfig) -> dict[str, Any]:
    """The `optimizer` and `scheduler` factories of cfg's groups (an absent group leaves the
    strategy's default), each tried on a one-number parameter: a bad value stops before work.
    """
    factories = {
        group: instantiate(cfg[group], _partial_=True, _convert_="all")
        for group in ("optimizer", "scheduler")
        if cfg.get(group) is not None
    }
    param = nn.Parameter(torch.zeros(1))
    tries = {
        "optimizer": lambda make: make([param]),
        "scheduler": lambda make: make(torch.optim.SGD([param], lr=1.0), 10),
    }
    for group, make in factories.items():
        try:
            tries[group](make)
        except (ValueError, TypeError) as err:
            raise ConfigError(naming(group, err)) from err
    return factories


def build_strategy(
    cfg: DictConfig, model: nn.Module, spec: DataSpec, optimization: dict[str, Any]
) -> L.LightningModule:
    """The LightningModule given `build_optimization(cfg)`, with the resolved config saved in
    its hyperparameters."""
    module = instantiate(cfg.strategy, _partial_=True, _convert_="all")(
        model=model, spec=spec, **optimization
    )
    module.hparams["cfg"] = OmegaConf.to_container(cfg, resolve=True)
    return module


def build_all(cfg: DictConfig) -> tuple[L.LightningDataModule, DataSpec, L.LightningModule]:
    """Validate and build; any bad input surfaces as one ConfigError line naming the key."""
    try:
        validate(cfg)
        optimization = build_optimization(cfg)
        datamodule, spec = build_datamodule(cfg)
        model = build_model(cfg, spec)
        return datamodule, spec, build_strategy(cfg, model, spec, optimization)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, BAD_INPUT):
            raise ConfigError(first_line(cause)) from cause
        raise
    except BAD_INPUT as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(first_line(err)) from err


def naming(key: str, err: BaseException) -> str:
    """The first line of `err`, prefixed with the config `key` it came from unless it names a
    key under it already (`model.dim=…`)."""
    first = first_line(err)
    return first if first.startswith((f"{key}.", f"{key}=", f"{key}:")) else f"{key}: {first}"


def instantiate_checked(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node)`; a constructor's complaint becomes one ConfigError naming `key`."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        raise ConfigError(naming(key, err.__cause__ or err)) from err
    except (ValueError, TypeError) as err:  # Lightning's MisconfigurationException included
        raise ConfigError(naming(key, err)) from err


def instantiate_dict(node: DictConfig | None, group: str = "") -> list[Any]:
    """Instantiate every `_target_` entry of a named collection (callbacks, loggers)."""
    if not node:
        return []
    return [
        instantiate_checked(v, f"{group}.{k}" if group else str(k))
        for k, v in node.items()
        if v is not None and "_target_" in v
    ]


def check_monitors(cfg: DictConfig, module: Any) -> None:
    """`optimized_metric` and every `callbacks.<name>.monitor` of the config must be a metric
    the strategy logs."""
    if not isinstance(module, BaseStrategy):  # a user's own LightningModule: nothing to check
        return
    names = module.metric_names()
    wanted = [("optimized_metric", cfg.get("optimized_metric"))]
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is not None and node.get("monitor") is not None:
            wanted.append((f"callbacks.{name}.monitor", node.monitor))
    for key, metric in wanted:
        if metric is not None and not any(fnmatchcase(metric, n) for n in names):
            raise ConfigError(
                f"{key}={metric} is not a metric strategy={cfg.strategy._target_.split('.')[-1]} "
                f"logs; it logs: {', '.join(names)}"
            )


# Lightning's refusal of a fraction of a loader that is less than one batch
_NO_BATCH = re.compile(r"check (\S+) of the `(\w+)_dataloader` but \S+ \* (\d+) < 1")


def no_batch_line(key: str, limit: float, batches: int) -> str:
    """One line for a batch fraction that leaves none of a loader's `batches`."""
    return (f"{key}={limit} of {batches} batches is none: give at least {1 / batches:.3g}, or "
            "a count of batches")  # fmt: skip


def batch_limit_error(err: Exception, prefix: str) -> ConfigError | None:
    """Lightning's refusal of a `limit_<stage>_batches` fraction that leaves no batch (a
    traceback, after training for the test's) as one ConfigError line naming the key as the
    user writes it (`prefix` "trainer." for train.py, "" for eval.py); None for other errors."""
    found = _NO_BATCH.search(str(err))
    if found is None:
        return None
    limit, stage, batches = found.groups()
    return ConfigError(no_batch_line(f"{prefix}limit_{stage}_batches", float(limit), int(batches)))


def check_batch_fractions(cfg: DictConfig, datamodule: Any) -> None:
    """A fraction of the training, validation or test batches that leaves none, refused
    before training starts (Lightning finds it as it starts, validates or tests, the run
    folder written), for the stages the run has (`train`, `test`). Loaders that cannot be
    built yet (they need the trainer) are left to `batch_limit_error`."""
    from lightning.fabric.utilities.data import has_len

    stages = ["train", "val"] if cfg.get("train", True) else []
    trainer_cfg = cfg.trainer
    for stage in [*stages, "test"] if cfg.get("test", True) else stages:
        limit = trainer_cfg.get(f"limit_{stage}_batches")
        if not isinstance(limit, float) or not 0 < limit < 1:
            continue
        try:
            loaders = getattr(datamodule, f"{stage}_dataloader")()
        except Exception:  # noqa: BLE001  (checked as Lightning builds it)
            continue
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            if has_len(loader) and len(loader) > 0 and int(len(loader) * limit) == 0:
                key = f"trainer.limit_{stage}_batches"
                raise ConfigError(no_batch_line(key, limit, len(loader)))
