"""Typed block configs: every range and cross-field check lives in a config and names the key
as the user writes it; the block constructors and the Model report the very same line."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from advarch.models.blocks.attention import AttentionConfig
from advarch.models.blocks.config import ModelShape
from advarch.models.blocks.ffn import FeedForwardConfig
from advarch.models.blocks.moe import MoE, MoEConfig
from advarch.models.blocks.sliding_window import SlidingWindowAttention, SlidingWindowConfig
from advarch.models.blocks.ssd import Mamba2, SSDConfig
from advarch.models.blocks.ssm import SelectiveSSM, SSMConfig
from advarch.models.model import Model
from advarch.models.retro_lm import RetroConfig

SHAPE = ModelShape(dim=32, depth=3, num_heads=4, ffn_hidden=64)


def message(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text
    return text


def test_model_shape_defaults_are_the_model_defaults() -> None:
    defaults = {k: p.default for k, p in inspect.signature(Model).parameters.items()}
    for field in dataclasses.fields(ModelShape):
        assert field.default == defaults[field.name], field.name


def test_hidden_defaults_to_four_times_dim() -> None:
    assert ModelShape(dim=8).hidden == 32 and ModelShape(dim=8, ffn_hidden=5).hidden == 5


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (dict(dim=0), "model.dim=0 must be >= 1"),
        (dict(depth=0), "model.depth=0 must be >= 1"),
        (dict(ffn_hidden=0), "model.ffn_hidden=0 must be >= 1 or null"),
        (dict(activation="relu"), "model.activation='relu' is not one of: gelu, swiglu"),
        (dict(norm="batch"), "model.norm='batch' is not one of: rmsnorm, layernorm"),
        (dict(dropout=1.0), "model.dropout=1.0 must be in [0, 1)"),
    ],
)
def test_model_keys_name_themselves(shape: dict, expected: str) -> None:
    assert message(ModelShape(**shape).validate) == expected


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (dict(dim=30, num_heads=4), "model.num_heads=4 must divide model.dim=30"),
        (dict(num_heads=0), "model.num_heads=0 must be >= 1"),
    ],
)
def test_num_heads_is_checked_by_the_blocks_that_attend(shape: dict, expected: str) -> None:
    for config in (AttentionConfig(), RetroConfig()):
        assert message(lambda c=config: c.validate(ModelShape(**shape))) == expected
    for config in (SSMConfig(), SSDConfig(head_dim=2), MoEConfig(), FeedForwardConfig()):
        config.validate(ModelShape(**shape))  # no attention: the heads are not read


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (MoEConfig(top_k=9), "model.moe.top_k=9 exceeds model.moe.num_experts=8"),
        (MoEConfig(num_experts=0), "model.moe.num_experts=0 must be >= 1"),
        (
            MoEConfig(soft=True, capacity_factor=1.25),
            "model.moe.capacity_factor=1.25 must be null with model.moe.soft=true",
        ),
        (MoEConfig(soft=True, aux_free_bias=True), "model.moe.aux_free_bias=True needs top-k"),
        (MoEConfig(bias_update_rate=0.0), "model.moe.bias_update_rate=0.0 must be > 0"),
        (SlidingWindowConfig(window=0), "model.swa.window=0 must be >= 1"),
        (SlidingWindowConfig(num_heads=3), "model.swa.num_heads=3 must divide model.dim=32"),
        (SlidingWindowConfig(num_heads=0), "model.swa.num_heads=0 must be >= 1"),
        (SlidingWindowConfig(num_heads=-2), "model.swa.num_heads=-2 must be >= 1"),
        (SlidingWindowConfig(num_heads=32), "model.dim / model.swa.num_heads = 1 must be even"),
        (SlidingWindowConfig(block_size=0), "model.swa.block_size=0 must be >= 1 or null"),
        (SSMConfig(d_conv=0), "model.ssm.d_conv=0 must be >= 1"),
        (SSMConfig(dt_rank=0), "model.ssm.dt_rank=0 must be >= 1"),
        (SSMConfig(dt_min=0.2), "model.ssm.dt_min=0.2 must be in (0, model.ssm.dt_max=0.1]"),
        (SSDConfig(head_dim=48), "model.ssd.head_dim=48 must divide model.ssd.expand"),
        (SSDConfig(chunk_size=0), "model.ssd.chunk_size=0 must be >= 1"),
        (RetroConfig(cca_layers=[3]), "model.retro.cca_layers=[3] must be distinct"),
        (RetroConfig(cca_layers=[1, 1]), "model.retro.cca_layers=[1, 1] must be distinct"),
        (RetroConfig(encoder_depth=0), "model.retro.encoder_depth=0 must be >= 1"),
        (RetroConfig(activation="relu"), "model.retro.activation='relu' is not one of"),
        (RetroConfig(dropout=-0.1), "model.retro.dropout=-0.1 must be in [0, 1)"),
    ],
)
def test_cross_field_checks_name_the_key(config, expected: str) -> None:
    assert message(lambda: config.validate(SHAPE)).startswith(expected)


def test_swa_heads_default_to_the_model_heads() -> None:
    assert SlidingWindowConfig().heads(SHAPE) == 4
    assert SlidingWindowConfig(num_heads=2).heads(SHAPE) == 2


@pytest.mark.parametrize(
    ("build", "config", "shape"),
    [
        (lambda: MoE(32, 64, top_k=9), MoEConfig(top_k=9), SHAPE),
        (lambda: MoE(32, 64, activation="relu"), MoEConfig(), dict(activation="relu")),
        (
            lambda: SlidingWindowAttention(32, 3, window=4),
            SlidingWindowConfig(window=4, num_heads=3),
            SHAPE,
        ),
        (lambda: SelectiveSSM(32, dt_min=0.5), SSMConfig(dt_min=0.5), SHAPE),
        (lambda: Mamba2(32, head_dim=48), SSDConfig(head_dim=48), SHAPE),
    ],
)
def test_constructors_report_the_config_check(build, config, shape) -> None:
    shape = shape if isinstance(shape, ModelShape) else dataclasses.replace(SHAPE, **shape)
    assert message(build) == message(lambda: config.validate(shape))


def test_model_reports_block_errors_only_for_blocks_it_uses() -> None:
    from advarch.spec import DataSpec

    spec = DataSpec(kind="lm", vocab_size=16, seq_len=8)
    kw = dict(dim=16, depth=1, num_heads=2, ffn_hidden=8)
    Model(spec, **kw, moe={"top_k": 9})  # dense FFNs: the MoE options are never used
    assert message(lambda: Model(spec, **kw, ffn="moe", moe={"top_k": 9})) == (
        "model.moe.top_k=9 exceeds model.moe.num_experts=8"
    )
    assert message(lambda: Model.check_options(**kw, ffn="moe", moe={"top_k": 9})) == (
        "model.moe.top_k=9 exceeds model.moe.num_experts=8"
    )


def test_model_without_attention_takes_any_num_heads() -> None:
    """A sweep over model.num_heads on an SSM-only model runs every trial; with attention (or
    a seq2seq decoder's cross-attention) a head count that does not divide dim is refused."""
    from advarch.spec import DataSpec

    lm = DataSpec(kind="lm", vocab_size=16, seq_len=8)
    kw = dict(dim=16, depth=2, num_heads=3, ffn_hidden=8)
    Model(lm, **kw, layers="ssm")
    Model.check_options(**kw, layers=["ssm", "ssd"], ssd={"head_dim": 8})
    expected = "model.num_heads=3 must divide model.dim=16"
    assert message(lambda: Model(lm, **kw, layers=["ssm", "attn"])) == expected
    assert message(lambda: Model.check_options(**kw, layers=["ssm", "attn"])) == expected
    seq2seq = DataSpec(kind="seq2seq", vocab_size=16, seq_len=8)
    assert message(lambda: Model(seq2seq, **kw, layers="ssm")) == expected
