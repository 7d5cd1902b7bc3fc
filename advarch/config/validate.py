"""Config validation against the constructors the YAMLs point at.

Each option YAML is `_target_` plus keys equal to the constructor's keyword arguments, so the
constructor's signature *is* the schema: unknown keys and wrong types are caught here, before
any work, with one line naming the key as the user writes it (`model.dim`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from advarch.typecheck import matches, wrong_type


class ConfigError(ValueError):
    """A config key has an unknown name, a wrong type or an impossible value."""


def _resolve_target(path: str, key: str) -> Any:
    try:
        return get_object(path)  # a class or a function; no type check, so no error log line
    except Exception as err:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported") from err


def validate_node(node: DictConfig, key: str, skip: Sequence[str] = ()) -> None:
    """Check `node`'s keys and value types against its `_target_`'s signature.

    Args:
        node: a config node with `_target_`.
        key: its dotted name as the user writes it (`model`, `data`).
        skip: arguments supplied by the code rather than the config (`spec`, `model`).
    Raises:
        ConfigError: naming the first offending key.
    """
    target = _resolve_target(node["_target_"], key)
    params, hints, accepts_any = _signature(target)
    container = OmegaConf.to_container(node, resolve=True)
    for name, value in container.items():
        if name.startswith("_") or name in skip:
            continue
        if name not in params:
            if accepts_any:
                continue
            known = ", ".join(p for p in params if p not in skip)
            raise ConfigError(
                f"{key}.{name} is not an option of {node['_target_']} (options: {known})"
            )
        hint = hints[name]
        if not matches(value, hint):
            raise ConfigError(wrong_type(f"{key}.{name}", value, hint))


def check_fields(values: DictConfig, schema: type) -> None:
    """Check a program's own settings (`generate.yaml`) against the types of a dataclass's
    fields: ConfigError naming the first key of the wrong type."""
    container = OmegaConf.to_container(values, resolve=True)
    for name, hint in typing.get_type_hints(schema).items():
        if name in container and not matches(container[name], hint):
            raise ConfigError(wrong_type(name, container[name], hint))


def _signature(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """(named parameters, type hints, takes any keyword) of a function or a class's __init__.

    A class whose __init__ hands `**kwargs` on to its base class (`super().__init__(**base)`)
    gets the base classes' parameters too, up to the first __init__ without `**kwargs`.
    """
    functions = [target]
    if inspect.isclass(target):
        functions = [c.__dict__["__init__"] for c in target.__mro__ if "__init__" in c.__dict__]
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for function in functions:
        try:
            own_hints = typing.get_type_hints(function)
        except Exception:
            own_hints = {}
        own = inspect.signature(function).parameters
        for name, param in own.items():
            if name != "self" and param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                params.setdefault(name, param)
                hints.setdefault(name, own_hints.get(name, param.annotation))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return params, hints, False
    return params, hints, True
