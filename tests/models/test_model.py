"""The pattern-built Model: sizes from the DataSpec, layer patterns, aux losses, heads."""

from __future__ import annotations

import pytest
import torch

from advarch.models.model import Model
from advarch.spec import DataSpec

LM = DataSpec(kind="lm", vocab_size=40, seq_len=16, task_names=("text",), pad_id=0)
CLS = DataSpec(kind="classification", num_features=64, num_classes=10, task_names=("digits",))
SMALL = dict(dim=16, depth=2, num_heads=2, ffn_hidden=32)


def mixers(model: Model) -> list[str]:
    return [type(layer.mixer).__name__ for layer in model.layers]


def test_lm_predicts_the_spec_vocabulary_and_is_causal() -> None:
    torch.manual_seed(0)
    model = Model(LM, **SMALL).eval()
    ids = torch.randint(1, 40, (2, 16))
    out = model(ids)
    assert out.logits.shape == (2, 16, 40)
    later = ids.clone()
    later[:, 10:] = (later[:, 10:] % 39) + 1
    torch.testing.assert_close(model(later).logits[:, :10], out.logits[:, :10])


def test_layer_pattern_repeats_over_depth() -> None:
    model = Model(LM, **{**SMALL, "depth": 4}, layers=["ssm", "attn"])
    assert mixers(model) == ["SelectiveSSM", "Attention"] * 2


@pytest.mark.parametrize(("ffn", "has_aux"), [("dense", False), ("moe", True)])
def test_only_moe_adds_an_aux_loss(ffn: str, has_aux: bool) -> None:
    torch.manual_seed(0)
    model = Model(LM, **SMALL, ffn=[ffn], moe={"num_experts": 4, "top_k": 2})
    aux = model(torch.randint(1, 40, (2, 16))).aux_loss
    assert (aux > 0).item() is has_aux and (aux == 0).item() is not has_aux


def test_classifier_head_has_the_spec_classes() -> None:
    model = Model(CLS, **SMALL, feature_patch=8)
    out = model(torch.rand(3, 64))
    assert out.logits.shape == (3, 10) and out.features.shape == (3, 16)
