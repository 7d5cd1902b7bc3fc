"""Typed block options: the model's shared widths and one small dataclass per block.

`ModelShape` holds the model's own keys every block is built from (`model.dim`,
`model.num_heads`, ...). A block's config (`MoEConfig`, `SlidingWindowConfig`, `SSMConfig`,
`SSDConfig`, `RetroConfig`) holds the keys a user writes under `model.<name>`; its fields equal
the block constructor's keywords. Dense attention and the dense FFN have configs without fields
(`AttentionConfig`, `FeedForwardConfig`), so every registered block builds the same way.

Every check lives in a config's `checks`, which the model builder, the pre-run validation
(`advarch.pipeline.validate`) and the block constructors all run, so each bad value gets the
same one line naming the key as the user writes it:
`model.moe.top_k=9 exceeds model.moe.num_experts=8`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from advarch.typecheck import matches, wrong_type

Checks = Iterator[tuple[bool, str]]  # (holds, the one-line message naming the key if not)
ACTIVATIONS = ("gelu", "swiglu")
NORMS = ("rmsnorm", "layernorm")


def heads_check(dim: int, heads: int, key: str) -> tuple[bool, str]:
    """Whether `heads` (the config's `key`) splits `model.dim` into equal heads, and the line
    naming it if not: the check of every attention block's head count."""
    if heads < 1:
        return False, f"{key}={heads} must be >= 1"
    return dim % heads == 0, f"{key}={heads} must divide model.dim={dim}"


def raise_first(checks: Checks) -> None:
    """ValueError with the message of the first check that does not hold (later ones unrun)."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


@dataclass(frozen=True)
class ModelShape:
    """The model's keys that blocks are sized from (defaults equal `Model`'s).

    Attributes:
        dim: model width D (`model.dim`).
        depth: layers (`model.depth`).
        num_heads: attention heads (`model.num_heads`), must divide `dim` where a layer has
            dense attention (`heads_check`; SSM-only models ignore it).
        ffn_hidden: FFN / expert hidden width (`model.ffn_hidden`; None = 4·dim).
        activation: FFN activation (`model.activation`).
        norm: normalisation layer (`model.norm`).
        dropout: dropout on attention and FFN outputs (`model.dropout`).
    """

    dim: int = 256
    depth: int = 4
    num_heads: int = 4
    ffn_hidden: int | None = None
    activation: str = "gelu"
    norm: str = "rmsnorm"
    dropout: float = 0.0

    @property
    def hidden(self) -> int:
        """The FFN hidden width: `ffn_hidden`, or 4·dim when unset."""
        return 4 * self.dim if self.ffn_hidden is None else self.ffn_hidden

    def checks(self) -> Checks:
        yield self.dim >= 1, f"model.dim={self.dim} must be >= 1"
        yield self.depth >= 1, f"model.depth={self.depth} must be >= 1"
        yield self.hidden >= 1, f"model.ffn_hidden={self.ffn_hidden} must be >= 1 or null"
        yield (
            self.activation in ACTIVATIONS,
            f"model.activation={self.activation!r} is not one of: {', '.join(ACTIVATIONS)}",
        )
        yield self.norm in NORMS, f"model.norm={self.norm!r} is not one of: {', '.join(NORMS)}"
        yield 0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)"

    def heads_check(self) -> tuple[bool, str]:
        """`model.num_heads` divides `model.dim`: checked by the blocks that attend with it."""
        return heads_check(self.dim, self.num_heads, "model.num_heads")

    def validate(self) -> None:
        raise_first(self.checks())


@dataclass(frozen=True)
class BlockConfig:
    """Base of the per-block configs: parsing from YAML options and validation.

    Subclasses are frozen dataclasses whose fields are the block's `model.<name>.*` keys; they
    set `name` (the YAML key under `model`, "" for blocks with no options of their own) and
    yield their range and cross-field checks from `checks(shape)`.
    """

    name: ClassVar[str] = ""

    @classmethod
    def key(cls, field: str) -> str:
        """A field as the user writes it: `model.moe.top_k`."""
        return f"model.{cls.name}.{field}"

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | BlockConfig | None) -> Self:
        """The config of a YAML mapping; unknown keys and wrong types raise naming the key."""
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping | None):
            raise ValueError(f"model.{cls.name} must be a mapping of options, got {options!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for field, value in (options or {}).items():
            if field not in names:
                known = ", ".join(names)
                raise ValueError(
                    f"{cls.key(field)} is not an option of model.{cls.name} (options: {known})"
                )
            if not matches(value, hints[field]):
                raise ValueError(wrong_type(cls.key(field), value, hints[field]))
        return cls(**(options or {}))

    def checks(self, shape: ModelShape) -> Checks:
        """(holds, message) pairs of this block's ranges and cross-field checks."""
        yield from ()

    def at_least_one(self, *fields: str) -> Checks:
        """`field >= 1` for each of `fields` (sizes and counts)."""
        for field in fields:
            value = self.__dict__[field]
            yield value >= 1, f"{self.key(field)}={value} must be >= 1"

    def ordered(self, low: str, high: str) -> tuple[bool, str]:
        """`0 < low <= high` (an initialisation range such as dt_min, dt_max)."""
        lo, hi = self.__dict__[low], self.__dict__[high]
        return 0 < lo <= hi, f"{self.key(low)}={lo} must be in (0, {self.key(high)}={hi}]"

    def validate(self, shape: ModelShape) -> None:
        """Raise ValueError naming the first invalid key (the model's keys first)."""
        raise_first(shape.checks())
        raise_first(self.checks(shape))

    def options(self) -> dict[str, Any]:
        """The fields as constructor keywords."""
        return {f.name: self.__dict__[f.name] for f in dataclasses.fields(self)}
