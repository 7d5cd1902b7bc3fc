"""The pattern-built Model: sizes from the DataSpec, layer patterns, aux losses, heads."""

from __future__ import annotations

import dataclasses

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


def test_padding_masks_only_for_data_whose_inputs_are_padded() -> None:
    # packed text never holds its pad id in the inputs, yet every forward built a (B, T, T)
    # mask of all False, which kept attention off its fused causal kernel (1.5× at T 2048)
    torch.manual_seed(0)
    padded = Model(LM, **SMALL).eval()
    packed = Model(dataclasses.replace(LM, padded_inputs=False), **SMALL).eval()
    packed.load_state_dict(padded.state_dict())
    calls: list[torch.Tensor | None] = []
    for layer in packed.layers:
        layer.mixer.register_forward_pre_hook(
            lambda _, args, kwargs: calls.append(kwargs["pad_mask"]), with_kwargs=True
        )
    ids = torch.randint(1, 40, (2, 16))
    ids[0, 3] = LM.pad_id  # a token that is the pad id: padding only where inputs are padded
    assert not torch.allclose(packed(ids).logits[0, 4:], padded(ids).logits[0, 4:])
    assert calls == [None, None]  # no mask reached the attention of the packed data's model
    unpadded = ids.clone()
    unpadded[0, 3] = 1
    torch.testing.assert_close(packed(unpadded).logits, padded(unpadded).logits)


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


def test_typed_block_configs_build_the_same_model_as_yaml_mappings() -> None:
    from advarch.models.blocks.moe import MoEConfig
    from advarch.models.blocks.ssm import SSMConfig

    kw = dict(SMALL, layers=["ssm", "attn"], ffn=["moe"])
    torch.manual_seed(0)
    typed = Model(LM, **kw, moe=MoEConfig(num_experts=4, top_k=2), ssm=SSMConfig(d_state=4))
    torch.manual_seed(0)
    mapped = Model(LM, **kw, moe={"num_experts": 4, "top_k": 2}, ssm={"d_state": 4})
    expected = mapped.state_dict()
    assert list(typed.state_dict()) == list(expected)
    for name, value in typed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    ids = torch.randint(1, 40, (2, 16))
    torch.testing.assert_close(typed(ids).logits, mapped(ids).logits)


def test_models_implement_the_strategy_protocols() -> None:
    from advarch.models.layers import RoutedFFN
    from advarch.models.output import ExpertModel, TaskHeads

    model = Model(LM, **SMALL, ffn=["dense", "moe"], moe={"num_experts": 4, "top_k": 2})
    assert isinstance(model, ExpertModel) and isinstance(model, TaskHeads)
    (moe,) = model.moe_layers()
    assert isinstance(moe, RoutedFFN) and moe is model.layers[1].ffn
    assert not isinstance(torch.nn.Linear(2, 2), ExpertModel)


def test_seq2seq_global_tokens_reach_the_encoder_not_the_causal_decoder() -> None:
    # global tokens (B, S) mark SOURCE positions for the bidirectional encoder's sliding-window
    # attention; the causal decoder (targets of another length T) must not receive them. The
    # model cleared the source pad_mask before the decoder but passed global_mask on, so a
    # seq2seq model with swa layers raised "global_mask needs bidirectional attention".
    spec = DataSpec(kind="seq2seq", vocab_size=30, seq_len=9, target_len=5, pad_id=0, bos_id=1)
    torch.manual_seed(0)
    model = Model(spec, **SMALL, layers=["swa"], swa={"window": 3}).eval()
    src, tgt = torch.randint(2, 30, (2, 9)), torch.randint(2, 30, (2, 5))
    glob = torch.zeros(2, 9, dtype=torch.bool)
    glob[:, 0] = True
    out = model(src, global_mask=glob, decoder_input_ids=tgt).logits
    assert out.shape == (2, 5, 30)
    plain = model(src, decoder_input_ids=tgt).logits
    assert not torch.allclose(out, plain)  # the encoder's first token saw the whole source
    later = tgt.clone()
    later[:, 3:] = later[:, 3:] % 28 + 2
    moved = model(src, global_mask=glob, decoder_input_ids=later).logits
    torch.testing.assert_close(moved[:, :3], out[:, :3])  # the decoder stays causal


def test_swa_global_tokens_serve_the_bidirectional_layers_and_an_lm_refuses_them() -> None:
    # `model.swa.global_tokens=[0]`: global in a classifier's encoder and a seq2seq encoder,
    # never in a seq2seq decoder (causal); a language model, all causal, refuses them
    swa = {"window": 3, "global_tokens": [0]}
    seq2seq = DataSpec(kind="seq2seq", vocab_size=30, seq_len=9, target_len=5, pad_id=0, bos_id=1)
    classifier = Model(CLS, **SMALL, layers=["swa"], swa=swa)
    translator = Model(seq2seq, **SMALL, layers=["swa", "attn"], swa=swa)
    assert [layer.mixer.global_tokens for layer in classifier.layers] == [[0], [0]]
    assert translator.encoder[0].mixer.global_tokens == [0]
    assert translator.layers[0].mixer.global_tokens == []
    with pytest.raises(ValueError, match=r"^model\.swa\.global_tokens=\[0\] needs bidirectional"):
        Model(LM, **SMALL, layers=["swa"], swa=swa)
    Model(LM, **SMALL, layers=["attn"], swa=swa)  # (no swa layer: nothing to refuse)


@pytest.mark.parametrize("encoder_depth", [0, -1])
def test_seq2seq_encoder_depth_below_one_is_refused(encoder_depth: int) -> None:
    # every other depth is range-checked (model.depth=0, model.retro.encoder_depth=0 are one
    # line each); model.encoder_depth=0 silently built a model.depth-layer encoder (`or depth`)
    # and -1 a seq2seq model with no encoder layer at all, both through train.py's validation
    spec = DataSpec(kind="seq2seq", vocab_size=30, seq_len=9, target_len=5, pad_id=0, bos_id=1)
    with pytest.raises(ValueError, match=f"model.encoder_depth={encoder_depth}"):
        Model.check_options(**SMALL, encoder_depth=encoder_depth)  # pipeline.validate's check
    with pytest.raises(ValueError, match=f"model.encoder_depth={encoder_depth}"):
        Model(spec, **SMALL, encoder_depth=encoder_depth)


def test_reach_notes_name_windows_that_cover_the_sequence_and_recurrent_encoders() -> None:
    # new user 40: `model=transformer 'model.layers=[swa]'` took the block's default window
    # (256) over 256-token sequences, full attention without a word; an ssm layer in a
    # seq2seq encoder reads the source left to right, where the README says bidirectional
    assert (
        "model.swa.window=16 covers the data's 16-token"
        in Model(LM, **SMALL, layers=["swa"], swa={"window": 16}).reach_notes()[0]
    )
    assert Model(LM, **SMALL, layers=["swa"], swa={"window": 15}).reach_notes() == []
    assert Model(CLS, **SMALL).reach_notes() == []
    seq2seq = DataSpec(kind="seq2seq", vocab_size=30, seq_len=9, target_len=5, pad_id=0, bos_id=1)
    notes = Model(seq2seq, **SMALL, layers=["ssm", "attn"]).reach_notes()
    assert notes == [
        "the seq2seq encoder's ssm/ssd layers read the source left to right (a recurrence): "
        "each source token sees only those before it"
    ]
