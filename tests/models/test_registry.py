"""The block registry: every entry builds from its typed config, configs round-trip through
YAML-like mappings, and bad names or options are one line naming the key."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from advarch.models.blocks.config import BlockConfig, ModelShape
from advarch.models.layers import Layer, LayerContext, RoutedFFN
from advarch.models.registry import (
    BLOCKS,
    NONE,
    build_block,
    check_model,
    expand_pattern,
    names,
)
from advarch.models.retro_lm import RetroAdapter
from advarch.spec import DataSpec

SHAPE = ModelShape(dim=16, depth=2, num_heads=2, ffn_hidden=32)
LAYER_BLOCKS = [name for name, b in BLOCKS.items() if b.role != "adapter"]
# small but valid options for blocks whose defaults are sized for real models
TINY = {"ssd": {"head_dim": 8, "chunk_size": 4, "d_state": 8}, "moe": {"num_experts": 4}}


def test_roles_partition_the_registry() -> None:
    assert names("mixer") == ["attn", "swa", "ssm", "ssd"]
    assert names("ffn") == ["dense", "moe"]
    assert names("adapter") == ["retro"]
    assert NONE not in BLOCKS


@pytest.mark.parametrize("name", list(BLOCKS))
def test_config_fields_are_the_block_keywords_and_round_trip(name: str) -> None:
    entry = BLOCKS[name]
    keywords = inspect.signature(entry.block).parameters
    fields = [f.name for f in dataclasses.fields(entry.config)]
    assert set(fields) <= set(keywords), f"{name}: config fields the block does not take"
    config = entry.config.from_options(TINY.get(name, {}))
    assert entry.config.from_options(config.options()) == config  # mapping → config → mapping
    assert entry.config.from_options(config) is config  # a typed config passes through


@pytest.mark.parametrize("name", LAYER_BLOCKS)
def test_every_layer_block_builds_from_its_config_and_trains(name: str) -> None:
    torch.manual_seed(0)
    config = BLOCKS[name].config.from_options(TINY.get(name, {}))
    config.validate(SHAPE)
    block = build_block(name, {name: config}, SHAPE, causal=True)
    assert isinstance(block, BLOCKS[name].block)
    role = BLOCKS[name].role
    layer = Layer(0, 16, block if role == "mixer" else None, block if role == "ffn" else None,
                  "rmsnorm")  # fmt: skip
    x = torch.randn(2, 8, 16, requires_grad=True)
    ctx = LayerContext()
    y = layer(x, ctx)
    assert y.shape == x.shape
    (y.square().mean() + sum(ctx.aux_losses, torch.zeros(()))).backward()
    grads = [p.grad for p in block.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert isinstance(block, RoutedFFN) is (name == "moe")


def test_retro_adapter_builds_from_its_config() -> None:
    spec = DataSpec(kind="lm", vocab_size=32, seq_len=16, retrieval_neighbours=2,
                    retrieval_chunk=4, retrieval_neighbour_len=8)  # fmt: skip
    config = BLOCKS["retro"].config.from_options({"encoder_depth": 1, "cca_layers": [1]})
    adapter = config.build_adapter(SHAPE, spec)
    assert isinstance(adapter, RetroAdapter) and adapter.cca_layers == (1,)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("moe", {"bogus": 1}, "model.moe.bogus is not an option of model.moe (options: "),
        ("moe", {"top_k": "2"}, "model.moe.top_k='2' has the wrong type (expected int)"),
        ("moe", {"soft": 1}, "model.moe.soft=1 has the wrong type (expected bool)"),
        ("swa", {"window": 1.5}, "model.swa.window=1.5 has the wrong type"),
        (
            "ssm",
            {"dt_rank": "x"},
            "model.ssm.dt_rank='x' has the wrong type (expected int or null)",
        ),
        ("retro", {"cca_layers": 3}, "model.retro.cca_layers=3 has the wrong type"),
        ("ssd", [1, 2], "model.ssd must be a mapping of options, got [1, 2]"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(name: str, options, message: str) -> None:
    with pytest.raises(ValueError) as err:
        BLOCKS[name].config.from_options(options)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("role", "pattern", "message"),
    [
        ("mixer", ["attn", "bogus"], "model.layers: unknown layer 'bogus'; choose from attn, swa"),
        ("ffn", "bogus", "model.ffn: unknown ffn 'bogus'; choose from dense, moe, none"),
        ("mixer", [], "model.layers must name at least one layer type"),
    ],
)
def test_bad_patterns_name_the_key(role, pattern, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        expand_pattern(pattern, 4, role)


def test_patterns_cycle_to_depth() -> None:
    assert expand_pattern(["ssm", "attn"], 5, "mixer") == ["ssm", "attn", "ssm", "attn", "ssm"]
    assert expand_pattern("moe", 2, "ffn") == ["moe", "moe"]


def options(**overrides) -> dict:
    base = dict(dim=16, depth=2, num_heads=2, layers="attn", ffn="dense", ffn_hidden=None,
                activation="gelu", norm="rmsnorm", dropout=0.0, moe=None, swa=None, ssm=None,
                ssd=None, retro=None)  # fmt: skip
    return {**base, **overrides}


def test_check_model_validates_only_the_blocks_the_patterns_use() -> None:
    bad_swa = {"window": 0}
    check_model(options(swa=bad_swa))  # not in model.layers: parsed, not range-checked
    with pytest.raises(ValueError, match=r"^model\.swa\.window=0 must be >= 1$"):
        check_model(options(layers=["attn", "swa"], swa=bad_swa))
    with pytest.raises(ValueError, match="model.swa.bogus is not an option"):
        check_model(options(swa={"bogus": 1}))  # unknown keys: always


def test_check_model_returns_the_shape_and_typed_configs() -> None:
    shape, configs = check_model(options(ffn=["moe"], moe={"num_experts": 4, "top_k": 1}))
    assert shape == ModelShape(dim=16, depth=2, num_heads=2)
    assert configs["moe"].num_experts == 4 and configs["moe"].top_k == 1
    assert all(isinstance(c, BlockConfig) for c in configs.values()) and set(configs) == set(BLOCKS)
