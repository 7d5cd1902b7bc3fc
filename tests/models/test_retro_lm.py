"""RETRO decoder wiring: retrieval off equals the plain decoder, the CCA path equals a plain
reference loop (outputs and gradients), end-to-end causality through `Model`, config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from advarch.models import Model
from advarch.models.retro_lm import RetroAdapter, default_cca_layers
from advarch.spec import DataSpec

M, K, PAD, VOCAB = 4, 2, 39, 40
SPEC = DataSpec(
    kind="lm",
    vocab_size=VOCAB,
    seq_len=16,
    pad_id=PAD,
    retrieval_neighbours=K,
    retrieval_chunk=M,
    retrieval_neighbour_len=2 * M,
)


def make_models(ffn: str = "dense", cca_layers=(1, 2), seed: int = 0) -> tuple[Model, Model]:
    """A RETRO model and a plain decoder holding the same decoder weights (float64)."""
    kw = dict(dim=16, depth=3, num_heads=2, ffn=[ffn], moe={"num_experts": 4, "top_k": 2})
    torch.manual_seed(seed)
    retro = Model(SPEC, retro={"cca_layers": list(cca_layers)}, **kw).double()
    plain = Model(SPEC, **kw).double()
    missing, unexpected = plain.load_state_dict(retro.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("retro.") for k in unexpected)
    return retro, plain


def batch(b: int = 2, t: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, PAD, (b, t), generator=g)
    neighbours = torch.randint(0, PAD, (b, t // M, K, 2 * M), generator=g)
    neighbours[0, 1, 1, 5:] = PAD  # a short continuation
    neighbours[1, 2, 0] = PAD  # a missing neighbour
    return inputs, neighbours


def retro_reference(model: Model, inputs: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
    """RETRO's layer (ATTN → CCA → FFN) spelled out with the blocks' own modules."""
    r = model.retro
    pad = neighbours == PAD
    h, enc = model.input(inputs), None
    for i, layer in enumerate(model.layers):
        h = h + layer.mixer(layer.mixer_norm(h))
        if i in r.cca_layers:
            if enc is None:
                enc = r.encoder(model.input(neighbours), h, neighbour_pad_mask=pad)
            h = h + r.cca[str(i)](r.cca_norm[str(i)](h), enc, neighbour_pad_mask=pad)
        h = h + layer.ffn(layer.ffn_norm(h))
    return model.head(model.final_norm(h))


def grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_matches_reference_outputs_and_gradients() -> None:
    retro, _ = make_models()
    inputs, nb = batch()
    got = retro(inputs, neighbours=nb).logits
    want = retro_reference(retro, inputs, nb)
    torch.testing.assert_close(got, want)
    w = torch.linspace(-1, 1, VOCAB, dtype=got.dtype)  # a loss that weighs every logit
    g_got = grads(retro, (got * w).sum())
    g_want = grads(retro, (retro_reference(retro, inputs, nb) * w).sum())
    assert g_got.keys() == g_want.keys() and any(k.startswith("retro.encoder") for k in g_got)
    for name in g_got:
        torch.testing.assert_close(g_got[name], g_want[name], msg=name)


@pytest.mark.parametrize("ffn", ["dense", "moe"])
@pytest.mark.parametrize("off", ["none", "k0", "padding"])
def test_retrieval_off_equals_plain_decoder(ffn: str, off: str) -> None:
    retro, plain = make_models(ffn)
    inputs, nb = batch(seed=1)
    neighbours = {"none": None, "k0": nb[:, :, :0], "padding": torch.full_like(nb, PAD)}[off]
    out, ref = retro(inputs, neighbours=neighbours), plain(inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    g_retro, g_plain = (
        grads(retro, out.logits.square().mean()),
        grads(plain, ref.logits.square().mean()),
    )
    for name, g in g_plain.items():
        torch.testing.assert_close(g_retro[name], g, msg=name)


def test_split_layer_path_equals_layer_forward() -> None:
    """With every CCA output projection zeroed, real neighbours change nothing: the adapter's
    mixer/FFN halves of a CCA layer reproduce `Layer.forward` (MoE aux losses included)."""
    retro, plain = make_models("moe", cca_layers=(0, 1, 2))
    for cca in retro.retro.cca.values():
        torch.nn.init.zeros_(cca.attn.to_out.weight)
    inputs, nb = batch(seed=2)
    out, ref = retro(inputs, neighbours=nb), plain(inputs)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert out.stats.keys() == ref.stats.keys()


def test_neighbours_matter() -> None:
    retro, plain = make_models()
    inputs, nb = batch(seed=3)
    assert not torch.allclose(retro(inputs, neighbours=nb).logits, plain(inputs).logits)


@pytest.mark.parametrize("u", range(4))
def test_chunk_neighbours_inform_only_positions_after_the_chunk(u: int) -> None:
    """Changing chunk u's neighbours leaves logits before u·m + m − 1 unchanged (and changes
    the one at u·m + m − 1: the token completing chunk u is the first to see them)."""
    retro, _ = make_models(cca_layers=(0, 2), seed=u)
    retro.eval()
    inputs, nb = batch(seed=4)
    other = nb.clone()
    other[:, u] = torch.randint(
        0, PAD, other[:, u].shape, generator=torch.Generator().manual_seed(9)
    )
    a, b = retro(inputs, neighbours=nb).logits, retro(inputs, neighbours=other).logits
    first = u * M + M - 1
    torch.testing.assert_close(a[:, :first], b[:, :first], rtol=0, atol=1e-12)
    assert (a[:, first] - b[:, first]).abs().max() > 1e-6


@pytest.mark.parametrize("p", [0, 3, 5, 11])
def test_tokens_inform_only_later_positions(p: int) -> None:
    retro, _ = make_models()
    inputs, nb = batch(seed=5)
    other = inputs.clone()
    other[:, p] = (other[:, p] + 1) % PAD
    a, b = retro(inputs, neighbours=nb).logits, retro(other, neighbours=nb).logits
    torch.testing.assert_close(a[:, :p], b[:, :p], rtol=0, atol=1e-12)
    assert (a[:, p] - b[:, p]).abs().max() > 1e-6


def test_default_placement_follows_retro() -> None:
    assert default_cca_layers(32) == [5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert default_cca_layers(4) == [2]
    assert default_cca_layers(2) == [1]
    assert default_cca_layers(1) == [0]


@pytest.mark.parametrize(
    ("kwargs", "spec", "match"),
    [
        ({"cca_layers": [3]}, SPEC, r"model\.retro\.cca_layers=\[3\] .*\[0, 3\)"),
        ({"cca_layers": [-1]}, SPEC, r"model\.retro\.cca_layers"),
        ({"cca_layers": [1, 1]}, SPEC, r"model\.retro\.cca_layers"),
        ({"cca_layers": []}, SPEC, r"model\.retro\.cca_layers"),
        ({"chunk_size": 8}, SPEC, r"model\.retro\.chunk_size=8 .*data\.retrieval\.chunk_size=4"),
        ({}, dataclasses.replace(SPEC, retrieval_neighbours=0), r"data=text_retrieval"),
    ],
)
def test_invalid_configuration_names_the_key(kwargs: dict, spec: DataSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetroAdapter(16, 3, spec, num_heads=2, **kwargs)


def test_chunk_size_equal_to_the_data_is_accepted() -> None:
    assert RetroAdapter(16, 3, SPEC, num_heads=2, chunk_size=M).encoder.chunk_size == M


def test_training_flops_per_token_count_the_neighbour_tokens() -> None:
    """The FLOPs behind RETRO's MFU equal torch's own count of its matmuls and attention
    (attention as matmuls), a forward and backward at T = L·m: the neighbour encoder runs on
    K·R/m neighbour tokens per decoder token (counted once per token, MFU read 43% of this)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from advarch.models.flops import training_flops_per_token

    inputs, nb = batch()
    for model, neighbours in zip(make_models(), (nb, None), strict=True):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(inputs, neighbours=neighbours).logits.sum().backward()
        counted = counter.get_total_flops() / inputs.numel()
        assert training_flops_per_token(model, inputs.shape[1]) == pytest.approx(counted)
