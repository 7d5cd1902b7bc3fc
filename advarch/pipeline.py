"""Building the pieces of a run from a composed config: datamodule → spec → model → strategy.

Shared by training, evaluation and the scripts, so a checkpoint's saved config rebuilds
exactly the module that wrote it.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from advarch.config.checks import check_collection, check_run_keys, check_trainer
from advarch.config.validate import ConfigError, validate_node
from advarch.models.model import Model
from advarch.spec import DataSpec

BAD_INPUT = (ValueError, TypeError, FileNotFoundError, ConnectionError)


def validate(cfg: DictConfig) -> None:
    """One-line ConfigError for unknown keys or wrong types in data, model and strategy."""
    for group, skip in (
        ("data", ()),
        ("model", ("spec", "compile")),
        ("strategy", ("model", "spec")),
    ):
        if group not in cfg or cfg[group] is None:
            raise ConfigError(f"{group} is not set; choose one with {group}=<name>")
        if "_target_" not in cfg[group]:
            raise ConfigError(f"{group}._target_ is missing")
        validate_node(cfg[group], group, skip)
    check_model_options(cfg.model)


def check_model_options(node: DictConfig) -> None:
    """Model's own checks (`Model.check_options`: ranges, cross-field, the typed block configs)
    on `model.*`, before anything is built; other model classes check in their constructor."""
    try:
        model_class = get_class(node._target_)
    except ValueError:  # a factory function, not a class: it checks when called
        return
    if issubclass(model_class, Model):
        options = OmegaConf.to_container(node, resolve=True)
        options = {k: v for k, v in options.items() if not k.startswith("_") and k != "compile"}
        try:
            model_class.check_options(**options)
        except ValueError as err:
            raise ConfigError(str(err)) from err


def validate_run(cfg: DictConfig) -> None:
    """Everything a training run reads: train.yaml's keys, trainer, callbacks, loggers, then
    data, model and strategy (`validate`). One ConfigError line naming the first bad key."""
    check_run_keys(cfg)
    if cfg.get("trainer") is not None:
        check_trainer(cfg.trainer)
    check_collection(cfg.get("callbacks"), "callbacks")
    check_collection(cfg.get("logger"), "logger")
    validate(cfg)


def build_datamodule(cfg: DictConfig) -> tuple[L.LightningDataModule, DataSpec]:
    datamodule = instantiate(cfg.data, _convert_="all")
    return datamodule, datamodule.spec


def build_model(cfg: DictConfig, spec: DataSpec) -> nn.Module:
    """The model of `cfg.model`; `model.compile=true` compiles its forward in place
    (`nn.Module.compile`: parameter names and checkpoints stay those of the plain model)."""
    options = OmegaConf.to_container(cfg.model, resolve=True)
    compile_model = options.pop("compile", False)
    if not isinstance(compile_model, bool):
        raise ConfigError(f"model.compile={compile_model!r} must be true or false")
    model = instantiate(options, _partial_=True, _convert_="all")(spec=spec)
    if compile_model:
        model.compile()
    return model


def build_strategy(cfg: DictConfig, model: nn.Module, spec: DataSpec) -> L.LightningModule:
    """The LightningModule, with the resolved config saved in its hyperparameters."""
    module = instantiate(cfg.strategy, _partial_=True, _convert_="all")(model=model, spec=spec)
    module.hparams["cfg"] = OmegaConf.to_container(cfg, resolve=True)
    return module


def build_all(cfg: DictConfig) -> tuple[L.LightningDataModule, DataSpec, L.LightningModule]:
    """Validate and build; any bad input surfaces as one ConfigError line naming the key."""
    try:
        validate(cfg)
        datamodule, spec = build_datamodule(cfg)
        model = build_model(cfg, spec)
        return datamodule, spec, build_strategy(cfg, model, spec)
    except InstantiationException as err:
        cause = err.__cause__ or err
        if isinstance(cause, BAD_INPUT):
            raise ConfigError(str(cause).splitlines()[0]) from cause
        raise
    except BAD_INPUT as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err).splitlines()[0]) from err


def instantiate_checked(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """`instantiate(node)`; a constructor's complaint becomes one ConfigError naming `key`."""
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise ConfigError(f"{key}: {first}") from cause
    except (ValueError, TypeError) as err:  # Lightning's MisconfigurationException included
        raise ConfigError(f"{key}: {str(err).strip().splitlines()[0]}") from err


def instantiate_dict(node: DictConfig | None, group: str = "") -> list[Any]:
    """Instantiate every `_target_` entry of a named collection (callbacks, loggers)."""
    if not node:
        return []
    return [
        instantiate_checked(v, f"{group}.{k}" if group else str(k))
        for k, v in node.items()
        if v is not None and "_target_" in v
    ]


def check_monitors(cfg: DictConfig, module: Any, callbacks: list[Any]) -> None:
    """`optimized_metric` and every callback's `monitor` must be a metric the strategy logs."""
    names = module.metric_names() if hasattr(module, "metric_names") else None
    if names is None:
        return
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
