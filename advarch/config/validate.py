"""Config validation against the constructors the YAMLs point at.

Each option YAML is `_target_` plus keys equal to the constructor's keyword arguments, so the
constructor's signature *is* the schema: unknown keys and wrong types are caught here, before
any work, with one line naming the key as the user writes it (`model.dim`).
"""

from __future__ import annotations

import inspect
import math
import sys
import typing
from collections.abc import Sequence
from typing import Any

from hydra._internal.utils import _locate
from omegaconf import DictConfig, OmegaConf

from advarch.errors import ConfigError
from advarch.reasons import short_reason
from advarch.typecheck import matches, wrong_type


def locate_target(path: str, key: str) -> Any:
    """The class or function `<key>._target_` names, or `unimportable_target`'s one line.

    Hydra's `_locate`, as `instantiate` uses it: `hydra.utils.get_object` logs three ERROR
    lines of its own (`Error getting object at …`, the import error, `Are you sure …`) before
    raising, ahead of the one `error:` line."""
    try:
        return _locate(path)
    except Exception as err:  # ImportError, ValueError (`a..b`), any error the module raises
        raise unimportable_target(path, key, err) from err


def unimportable_target(path: str, key: str, err: BaseException) -> ConfigError:
    """`<key>._target_=<path> cannot be imported (<the first error's reason>)`, and what to do
    when its package is not found (a user's own model, run from another folder)."""
    while err.__cause__ is not None:  # (Hydra wraps the import's error in its own)
        err = err.__cause__
    hint = ""
    if isinstance(err, ModuleNotFoundError) and err.name == path.split(".")[0]:
        hint = "; run from the folder that holds its module, or install it"
    return ConfigError(f"{key}._target_={path!r} cannot be imported ({short_reason(err)}){hint}")


def validate_node(node: DictConfig, key: str, skip: Sequence[str] = ()) -> None:
    """Check `node`'s keys and value types against its `_target_`'s signature.

    Args:
        node: a config node with `_target_`.
        key: its dotted name as the user writes it (`model`, `data`).
        skip: arguments supplied by the code rather than the config (`spec`, `model`).
    Raises:
        ConfigError: naming the first offending key.
    """
    target = locate_target(node["_target_"], key)
    params, hints, accepts_any = _signature(target)
    container = OmegaConf.to_container(node, resolve=True)
    for name, value in container.items():
        if name.startswith("_") or name in skip:
            continue
        nan = _holds_nan(value)  # (it passes every range check: NaN compares false)
        if name not in params:
            if accepts_any and not nan:  # (its **kwargs take it: their receiver checks it)
                continue
            if not accepts_any:
                known = ", ".join(p for p in params if p not in skip)
                raise ConfigError(
                    f"{key}.{name} is not an option of {node['_target_']} (options: {known})"
                )
        elif not matches(value, hints[name]):
            raise ConfigError(wrong_type(f"{key}.{name}", value, hints[name]))
        if nan:
            raise ConfigError(f"{key}.{name}={value} is not a number (nan): give a number")


def _holds_nan(value: Any) -> bool:
    """Whether a config value is NaN or holds one (in a list or mapping)."""
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, list) and any(_holds_nan(v) for v in value)


def takes_option(node: DictConfig, key: str, name: str) -> bool:
    """Whether `node`'s `_target_` (the config `key`'s) has a parameter `name`."""
    return name in _signature(locate_target(node["_target_"], key))[0]


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


def import_from_working_dir() -> None:
    """Let config `_target_`s name a user's own modules in the folder the command runs in
    (`examples/own_model`, a `--config-dir` project), as `python -m` would: a script's own
    folder (scripts/) or a console script's is on `sys.path`, the working directory is not."""
    import os

    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
