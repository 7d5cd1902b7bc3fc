"""Runtime checks of plain config values (YAML scalars, lists, mappings) against type hints.

One implementation for every schema: the `_target_` signatures Hydra configs point at
(`advarch.config.validate`) and the typed block configs (`advarch.models.blocks.config`).
It sits on its own so models and the Hydra edge can share it without importing each other.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any


def matches(value: Any, hint: Any) -> bool:
    """Check of a plain value against a type hint (ints pass for floats; sequences element-wise,
    mappings by kind only)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    base = origin or hint
    if base in (list, tuple, Sequence) or (
        isinstance(base, type) and issubclass(base, Sequence | tuple)
    ):
        if not isinstance(value, Sequence) or isinstance(value, str):
            return False
        args = typing.get_args(hint)
        if base is tuple and args and args[-1] is not Ellipsis:  # tuple[int, str]: fixed fields
            return len(value) == len(args) and all(map(matches, value, args))
        return not args or all(matches(v, args[0]) for v in value)  # list[int], tuple[int, ...]
    if base in (dict, Mapping) or (isinstance(base, type) and issubclass(base, Mapping)):
        return isinstance(value, Mapping)
    return True


def wrong_type(key: str, value: Any, hint: Any) -> str:
    """`<key>=<value> has the wrong type (expected <hint>)`, plus `quote_hint`'s advice; `is
    not one of: <choices>` where the hint is a set of choices and the value of a choice's type
    (`trainer.precision='16x'`: a wrong value, not a wrong type)."""
    choices, names = _literal_choices(hint)
    if any(type(c) is type(value) for c in choices) and set(names) <= {"null"}:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        nearest = f" (did you mean {key}={close[0]}?)" if close else ""
        return f"{key}={value!r} is not one of: {hint_name(hint).removeprefix('one of ')}{nearest}"
    advice = quote_hint(key, value, hint)
    if isinstance(value, float) and value.is_integer() and matches(int(value), hint):
        advice = f": write {key}={int(value)}"  # (`1e3` reads as a float)
    return f"{key}={value!r} has the wrong type (expected {hint_name(hint)}){advice}"


def quote_hint(key: str, value: Any, hint: Any = str) -> str:
    """`: nan reads as a float; quote it, run_name="'nan'"` when `value` is a number or a
    boolean whose text `hint` takes as a string, else "": Hydra (and YAML) read `nan`, `42`,
    `true` as values, so a name that looks like one must be quoted to stay text."""
    if not isinstance(value, bool | int | float) or not matches(str(value), hint):
        return ""
    text = str(value).lower()
    kind = {bool: "a boolean", int: "an integer", float: "a float"}[type(value)]
    return f": {text} reads as {kind}; quote it, {key}=\"'{text}'\""


def hint_name(hint: Any) -> str:
    """A type hint as a user reads it: `int or null`, `list of int`, `one of 'min', 'max'`."""
    choices, names = _literal_choices(hint)
    if choices:
        shown = [repr(c) for c in choices] + [n for n in names if n != "null"]
        return "one of " + ", ".join(shown) + (", null" if "null" in names else "")
    return " or ".join(dict.fromkeys(names))  # (Sequence[str] | list[str]: said once)


def _name(hint: Any) -> str:
    """One non-union hint: `null` for None, `list of X` for sequences, else its name."""
    if hint is type(None):
        return "null"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:  # fixed fields: say how many
        kinds = list(dict.fromkeys(hint_name(a) for a in args))
        return f"list of {len(args)}, " + (f"each {kinds[0]}" if len(kinds) == 1 else
                                             ", ".join(hint_name(a) for a in args))  # fmt: skip
    if origin is not None and isinstance(origin, type) and issubclass(origin, Sequence) and args:
        return f"list of {_name(args[0])}"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _literal_choices(hint: Any) -> tuple[list[Any], list[str]]:
    """(Literal values, names of the other types) of a hint, through Unions."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return list(typing.get_args(hint)), []
    if origin in (typing.Union, types.UnionType):
        choices, names = [], []
        for arg in typing.get_args(hint):
            c, n = _literal_choices(arg)
            choices += c
            names += n
        return choices, names
    return [], [_name(hint)]
