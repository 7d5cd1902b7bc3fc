"""One residual layer: the mixer call contract, routed FFNs by Protocol, and the residual wiring
checked against a hand-written reference."""

from __future__ import annotations

import torch
from torch import nn

from advarch.models.blocks.attention import Attention
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.sliding_window import SlidingWindowAttention
from advarch.models.blocks.ssd import Mamba2
from advarch.models.blocks.ssm import SelectiveSSM
from advarch.models.layers import Layer, LayerContext, RoutedFFN

D = 16


class RecordingMixer(nn.Module):
    """A mixer that records the keywords it is called with (the contract, nothing more)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[dict] = []

    def forward(self, x, *, pad_mask=None, global_mask=None):
        self.calls.append({"pad_mask": pad_mask, "global_mask": global_mask})
        return x * self.scale


class TinyRouter(nn.Module):
    """A routed FFN that is not an `MoE`: recognised by the RoutedFFN protocol alone."""

    num_experts = 2

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.pad_masks: list[torch.Tensor | None] = []

    def forward(self, x, expert_mask=None, pad_mask=None):
        self.pad_masks.append(pad_mask)
        gate = self.w if expert_mask is None else self.w * expert_mask
        return x * gate.sum(), gate.square().sum(), {"load": gate.detach()}

    def expert_tensors(self):
        return {"w": self.w}

    def update_routing_bias(self) -> None:
        return None


def test_every_mixer_takes_the_one_call_signature() -> None:
    torch.manual_seed(0)
    mixers = [
        Attention(D, 2, causal=False),
        SlidingWindowAttention(D, 2, window=4, causal=False),
        SelectiveSSM(D, d_state=4),
        Mamba2(D, d_state=4, head_dim=8, chunk_size=4),
    ]
    x = torch.randn(2, 6, D)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    glob = torch.zeros(2, 6, dtype=torch.bool)
    glob[:, 0] = True
    for mixer in mixers:
        assert mixer(x, pad_mask=pad, global_mask=glob).shape == x.shape


def test_layer_passes_both_masks_to_every_mixer() -> None:
    mixer = RecordingMixer()
    pad, glob = torch.zeros(1, 3, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    Layer(0, 4, mixer, None, "rmsnorm")(torch.randn(1, 3, 4), LayerContext(pad, glob))
    assert mixer.calls[0]["pad_mask"] is pad and mixer.calls[0]["global_mask"] is glob


def test_global_tokens_reach_the_sliding_window_mixer() -> None:
    torch.manual_seed(0)
    swa = SlidingWindowAttention(D, 2, window=2, causal=False)
    layer = Layer(0, D, swa, None, "rmsnorm")
    x = torch.randn(1, 10, D)
    glob = torch.zeros(1, 10, dtype=torch.bool)
    glob[0, 0] = True
    with_global = layer(x, LayerContext(global_mask=glob))
    expected = x + swa(layer.mixer_norm(x), global_mask=glob)
    torch.testing.assert_close(with_global, expected)
    assert not torch.allclose(with_global, layer(x, LayerContext()))  # token 9 now sees token 0


def test_routed_ffns_are_recognised_by_protocol_not_by_class() -> None:
    assert isinstance(MoE(D, 8, num_experts=2, top_k=1), RoutedFFN)
    assert isinstance(TinyRouter(), RoutedFFN)
    assert not isinstance(FeedForward(D, 8), RoutedFFN)
    assert Layer(0, D, None, TinyRouter(), "rmsnorm").is_moe
    assert not Layer(0, D, None, FeedForward(D, 8), "rmsnorm").is_moe


def test_routed_ffn_gets_both_masks_and_reports_aux_loss_and_stats() -> None:
    router = TinyRouter()
    layer = Layer(3, 4, None, router, "rmsnorm")
    pad = torch.tensor([[False, True]])
    ctx = LayerContext(pad_mask=pad, expert_mask=torch.tensor([1.0, 0.0]))
    x = torch.randn(1, 2, 4)
    y = layer(x, ctx)
    torch.testing.assert_close(y, x + layer.ffn_norm(x) * 1.0)  # only expert 0 allowed
    assert len(ctx.aux_losses) == 1 and ctx.aux_losses[0].item() == 1.0
    assert set(ctx.stats) == {"moe/layer3/load"}
    assert router.pad_masks == [pad]  # padding counts in no routing statistic


def test_layer_equals_the_pre_norm_residual_reference() -> None:
    torch.manual_seed(0)
    mixer, ffn = Attention(D, 2), FeedForward(D, 32)
    layer = Layer(0, D, mixer, ffn, "layernorm").double()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    h = x + mixer(layer.mixer_norm(x))
    reference = h + ffn(layer.ffn_norm(h))
    y = layer(x, LayerContext())
    torch.testing.assert_close(y, reference)
    (gx,) = torch.autograd.grad(y.sum(), x)
    (gr,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(gx, gr)


def test_a_layer_without_sublayers_is_the_identity() -> None:
    x = torch.randn(1, 3, 4)
    assert torch.equal(Layer(0, 4, None, None, "rmsnorm")(x, LayerContext()), x)
