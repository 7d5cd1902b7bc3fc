"""The one registry of blocks a model config can name, each with its typed config.

`model.layers` names sequence mixers, `model.ffn` feed-forward sub-layers, and `model.retro`
adds RETRO's adapter. Each entry pairs the block class with its config class
(`advarch/models/blocks/config.py`): the config parses the `model.<name>` options, checks them
against the model's shape and builds the block. Adding a block is a class, its config and one
line in `BLOCKS`, here or from a project's own module (`examples/own_block`: `Model` takes the
options of every registered block by its name). `check_model` runs every check a `Model` makes
on its options; the model builder and the pre-run validation (`advarch.pipeline.validate`)
both call it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from advarch.models.blocks.attention import Attention, AttentionConfig
from advarch.models.blocks.config import BlockConfig, ModelShape
from advarch.models.blocks.ffn import FeedForward, FeedForwardConfig
from advarch.models.blocks.moe import MoE, MoEConfig
from advarch.models.blocks.sliding_window import SlidingWindowAttention, SlidingWindowConfig
from advarch.models.blocks.ssd import Mamba2, SSDConfig
from advarch.models.blocks.ssm import SelectiveSSM, SSMConfig
from advarch.models.retro_lm import RetroAdapter, RetroConfig

Role = Literal["mixer", "ffn", "adapter"]


@dataclass(frozen=True)
class Block:
    """A registered block: where it goes in a layer, its class, its typed config."""

    role: Role
    block: type[nn.Module]
    config: type[BlockConfig]


BLOCKS: dict[str, Block] = {
    "attn": Block("mixer", Attention, AttentionConfig),
    "swa": Block("mixer", SlidingWindowAttention, SlidingWindowConfig),
    "ssm": Block("mixer", SelectiveSSM, SSMConfig),
    "ssd": Block("mixer", Mamba2, SSDConfig),
    "dense": Block("ffn", FeedForward, FeedForwardConfig),
    "moe": Block("ffn", MoE, MoEConfig),
    "retro": Block("adapter", RetroAdapter, RetroConfig),
}
NONE = "none"  # a layer without that sub-layer
PATTERNS: dict[Role, tuple[str, str]] = {
    "mixer": ("model.layers", "layer"),
    "ffn": ("model.ffn", "ffn"),
}  # role: (its pattern's key, what an entry is called in errors)


def names(role: Role) -> list[str]:
    """Registered blocks of `role`, in registry order."""
    return [name for name, b in BLOCKS.items() if b.role == role]


def check_pattern(pattern: str | Sequence[str], role: Role) -> list[str]:
    """A per-layer pattern's entries (a single name is one entry); unknown names raise."""
    key, noun = PATTERNS[role]
    items = [pattern] if isinstance(pattern, str) else list(pattern)
    if not items:
        raise ValueError(f"{key} must name at least one layer type")
    choices = [*names(role), NONE]
    for kind in items:
        if kind not in choices:
            raise ValueError(f"{key}: unknown {noun} {kind!r}; choose from {', '.join(choices)}")
    return items


def expand_pattern(pattern: str | Sequence[str], depth: int, role: Role) -> list[str]:
    """Cycle a per-layer pattern to `depth` entries."""
    items = check_pattern(pattern, role)
    return [items[i % len(items)] for i in range(depth)]


def block_configs(options: Mapping[str, Any]) -> dict[str, BlockConfig]:
    """The typed config of every registered block from a model's `moe`, `swa`, ... options
    (mappings or configs; defaults where unset). Unknown keys and wrong types raise."""
    return {name: b.config.from_options(options.get(name)) for name, b in BLOCKS.items()}


def check_model(options: Mapping[str, Any]) -> tuple[ModelShape, dict[str, BlockConfig]]:
    """Every check of a `Model`'s keyword options, before anything is built.

    Args:
        options: the Model's keywords, all of them (`Model.check_options` fills defaults).

    Returns:
        The model's shape and the typed config of every block.

    Raises:
        ValueError: one line naming the first invalid key as the user writes it.
    """
    shape_keys = [f.name for f in dataclasses.fields(ModelShape)]
    shape = ModelShape(**{k: options[k] for k in shape_keys})
    shape.validate()
    encoder_depth = options.get("encoder_depth")
    if encoder_depth is not None and encoder_depth < 1:
        raise ValueError(f"model.encoder_depth={encoder_depth} must be >= 1 or null (model.depth)")
    configs = block_configs(options)
    used = {*check_pattern(options["layers"], "mixer"), *check_pattern(options["ffn"], "ffn")}
    if options.get("retro"):  # an empty mapping leaves RETRO off, as `Model` does
        used.add("retro")
    for name in sorted(used - {NONE}, key=list(BLOCKS).index):
        configs[name].validate(shape)
    return shape, configs


def build_block(
    kind: str, configs: Mapping[str, BlockConfig], shape: ModelShape, causal: bool
) -> nn.Module | None:
    """The mixer or FFN `kind` of one layer (None for `none`), from its typed config."""
    return None if kind == NONE else configs[kind].build(shape, causal)
