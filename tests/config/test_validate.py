"""Config validation against `_target_` signatures, and the one type checker it shares with the
typed block configs (`advarch/typecheck.py`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytest
from omegaconf import OmegaConf

from advarch.config.validate import validate_node
from advarch.errors import ConfigError
from advarch.typecheck import hint_name, matches, quote_hint


def target(
    size: int,
    rate: float = 0.1,
    mode: Literal["min", "max"] = "min",
    name: str | None = None,
    layers: Sequence[int] = (),
    flag: bool = False,
    options: dict | None = None,
    anything: Any = None,
) -> None:
    """A constructor-like callable to validate against."""


TARGET = f"{__name__}.target"


@pytest.mark.parametrize(
    ("value", "hint", "ok"),
    [
        (3, int, True),
        (True, int, False),  # YAML booleans are not counts
        (3, float, True),  # ints pass for floats
        (3.5, int, False),
        ("x", str, True),
        (None, int | None, True),
        ("a", Literal["a", "b"], True),
        ("c", Literal["a", "b"], False),
        ([1, 2], Sequence[int], True),
        ((1, 2), list[int], True),
        ("12", Sequence[int], False),  # a string is not a list of things
        ([1, "x"], list[int], False),  # elements are checked too
        ([3, 4], tuple[int, ...], True),
        ([1, "a"], tuple[int, str], True),
        ([1], tuple[int, str], False),
        ({"a": 1}, dict, True),
        ([1], dict, False),
        (object(), Any, True),
    ],
)
def test_matches(value: Any, hint: Any, ok: bool) -> None:
    assert matches(value, hint) is ok


def test_hint_names_read_as_a_user_would() -> None:
    assert hint_name(int) == "int"
    assert hint_name(Literal["min", "max"]) == "one of 'min', 'max'"
    assert hint_name(Literal["a"] | None) == "one of 'a', null"
    assert hint_name(int | None) == "int or null"
    assert hint_name(Sequence[int] | None) == "list of int or null"


@pytest.mark.parametrize(
    ("value", "hint", "advice"),
    [
        (float("nan"), str, ": nan reads as a float; quote it, key=\"'nan'\""),
        (42, str | None, ": 42 reads as an integer; quote it, key=\"'42'\""),
        (True, str, ": true reads as a boolean; quote it, key=\"'true'\""),
        (1, Literal["a", "b"], ""),  # quoting would not help
        (None, str, ""),  # null is no text: nothing to quote
        ([1], str, ""),
    ],
)
def test_a_number_for_text_says_to_quote_it(value: Any, hint: Any, advice: str) -> None:
    assert quote_hint("key", value, hint) == advice


def validate(**options: Any) -> None:
    validate_node(OmegaConf.create({"_target_": TARGET, **options}), "thing", skip=("spec",))


def test_a_valid_node_passes_and_skipped_keys_are_not_checked() -> None:
    validate(size=1, rate=1, mode="max", name=None, layers=[1, 2], flag=True, options={})
    validate(size=1, spec="supplied by the code")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"size": "big"}, "thing.size='big' has the wrong type (expected int)"),
        ({"size": 1, "mode": "mid"}, "thing.mode='mid' is not one of: 'min', 'max'"),
        ({"size": 1, "mode": 3}, "thing.mode=3 has the wrong type (expected one of 'min', 'max'"),
        ({"size": 1, "flag": "yes"}, "thing.flag='yes' has the wrong type (expected bool)"),
        ({"size": 1, "layers": 3}, "thing.layers=3 has the wrong type"),
        ({"size": 1, "bogus": 2}, f"thing.bogus is not an option of {TARGET} (options: size,"),
    ],
)
def test_the_first_bad_key_is_one_line(options: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(**options)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_an_unimportable_target_names_the_key() -> None:
    node = OmegaConf.create({"_target_": "nowhere.Thing"})
    with pytest.raises(ConfigError, match=r"^model\._target_='nowhere\.Thing' cannot be imported"):
        validate_node(node, "model")


def test_interpolations_are_resolved_before_checking() -> None:
    node = OmegaConf.create({"_target_": TARGET, "size": "${width}", "width": 4})
    with pytest.raises(ConfigError, match="thing.width is not an option"):
        validate_node(node, "thing")
    validate_node(OmegaConf.create({"a": 4, "t": {"_target_": TARGET, "size": "${a}"}}).t, "t")


def own_model(size: int, **options: Any) -> None:
    """A user's own constructor that takes any option (its **options checked by its code)."""


def test_a_nan_is_refused_in_options_taken_by_kwargs_too() -> None:
    # (the NaN check came after the name lookup, which lets **kwargs options through unchecked)
    node = OmegaConf.create({"_target_": f"{__name__}.own_model", "size": 2, "rate": float("nan")})
    with pytest.raises(ConfigError, match=r"^model\.rate=nan is not a number \(nan\)"):
        validate_node(node, "model")
    validate_node(OmegaConf.create({**node, "rate": 0.5}), "model")  # any other value passes


def test_a_whole_float_for_an_integer_says_how_to_write_it() -> None:
    # new-user 37 F12: `trainer.max_steps=1e3` reads as the float 1000.0
    node = OmegaConf.create({"_target_": TARGET, "size": 1e3})
    with pytest.raises(ConfigError) as err:
        validate_node(node, "model")
    assert str(err.value) == (
        "model.size=1000.0 has the wrong type (expected int): write model.size=1000"
    )


def named_model(size: int, activation: str = "gelu") -> None:
    """A constructor without **kwargs, with a string option."""


@pytest.mark.parametrize(
    ("option", "said"),
    [
        ("activation", r"^model\.activation=nan has the wrong type"),  # a string: no number
        ("dimm", r"^model\.dimm is not an option"),  # a misspelt key: no number either
    ],
)
def test_a_nan_where_no_number_goes_is_not_asked_for_a_number(option: str, said: str) -> None:
    # review 37b: 5cbc55d moved the NaN check before the name lookup and the type check: a
    # `nan` typed for a string option, or under a misspelt key, now reads `give a number`
    node = OmegaConf.create(
        {"_target_": f"{__name__}.named_model", "size": 2, option: float("nan")}
    )
    with pytest.raises(ConfigError, match=said):
        validate_node(node, "model")
