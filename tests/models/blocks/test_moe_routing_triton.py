"""The Triton MoE routing against `MoE._route`'s torch composition: every output and the
logits' gradient, then the whole block with either routing.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set by the test
package before anything imports Triton), forced on with `MoE.use_triton`; sizes cover a partial
token block, an expert count that is not a power of two, K = 1 (Switch) and K = 3, masked
experts, the selection bias, and losses using the gates, the aux loss or both.
"""

from __future__ import annotations

import copy

import pytest
import torch

from advarch.models.blocks import moe
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.moe_experts import grouped_mm_supported

pytest.importorskip("triton")
pytest.importorskip("advarch.models.blocks.moe_routing_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # tokens, experts, top_k, selection bias, masked experts
    (100, 8, 2, False, False),
    (37, 6, 1, False, False),
    (130, 12, 3, True, True),
    (64, 8, 2, True, False),
]


def _route(block: MoE, logits: torch.Tensor, allowed, fused: bool) -> moe.Routing:
    block.use_triton = fused
    return block._route(logits, allowed)


def _logits(tokens: int, experts: int, top_k: int, masked: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g) * 2
    allowed = None
    if masked:  # each token keeps its first top_k experts and ~70% of the rest
        allowed = torch.rand(tokens, experts, generator=g) > 0.3
        allowed[:, :top_k] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
        allowed = allowed.to(DEVICE)
    return logits.to(DEVICE), allowed


@pytest.mark.parametrize(("tokens", "experts", "top_k", "bias", "masked"), CASES)
def test_routing_matches_reference(tokens, experts, top_k, bias, masked):
    block = MoE(8, 16, experts, top_k, aux_free_bias=bias, balance_loss_weight=0.3,
                z_loss_weight=0.2).to(DEVICE)  # fmt: skip
    if bias:
        block.routing_bias.copy_(torch.linspace(-0.1, 0.1, experts))
    logits, allowed = _logits(tokens, experts, top_k, masked, seed=tokens)
    gate_grad = torch.randn(tokens, top_k, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for uses_gates, uses_aux in ((True, True), (True, False), (False, True)):
        grads, routes = [], []
        for fused in (True, False):
            leaf = logits.clone().requires_grad_()
            route = _route(block, leaf, allowed, fused)
            terms = [(route.gates * gate_grad).sum()] if uses_gates else []
            terms += [3.0 * route.aux_loss] if uses_aux else []  # an unused output: no gradient
            sum(terms).backward()
            grads.append(leaf.grad)
            routes.append(route)
        ours, ref = routes
        assert torch.equal(ours.expert, ref.expert)
        for name in ("counts", "offsets", "order", "inverse"):
            assert torch.equal(getattr(ours, name).long(), getattr(ref, name).long()), name
        for name in ("gates", "aux_loss", "load", "entropy", "balance", "z_loss"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), msg=name)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
        if masked:
            assert (grads[0][~allowed] == 0).all()


@pytest.mark.parametrize(
    ("capacity_factor", "grouped"), [(None, False), (None, True), (0.75, False)]
)
@pytest.mark.parametrize(("top_k", "activation"), [(2, "gelu"), (1, "swiglu")])
def test_block_matches_reference_routing(top_k, activation, capacity_factor, grouped):
    """The MoE block's output, aux loss, statistics and every gradient are the same with the
    Triton routing (and, on the grouped matmul, token moves) as with torch's (experts masked
    per sequence, selection bias), dropless on the loop and on the grouped matmul
    (`DroplessExperts`), and with a capacity."""
    if grouped and not grouped_mm_supported(torch.float32, DEVICE):
        pytest.skip("no grouped matmul here")
    torch.manual_seed(0)
    ref = MoE(16, 32, 6, top_k, activation=activation, capacity_factor=capacity_factor,
              aux_free_bias=True).to(DEVICE)  # fmt: skip
    ref.routing_bias.copy_(torch.linspace(-0.05, 0.05, 6))
    ref.use_grouped_mm = grouped
    ours = copy.deepcopy(ref)
    x = torch.randn(3, 11, 16, device=DEVICE)
    mask = torch.tensor([[True] * 6, [True, False] * 3, [False, True, True, True, False, True]])
    results = []
    ours.use_triton, ref.use_triton = True, False
    for block in (ours, ref):
        leaf = x.clone().requires_grad_()
        y, aux, stats = block(leaf, expert_mask=mask.to(DEVICE))
        (y.square().sum() + aux).backward()
        grads = [leaf.grad] + [p.grad for p in block.parameters()]
        results.append((y, aux, stats, grads, block.load_counts.clone()))
    (y, aux, stats, grads, counts), (y_ref, aux_ref, stats_ref, grads_ref, counts_ref) = results
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(aux, aux_ref)
    torch.testing.assert_close(stats, stats_ref)
    torch.testing.assert_close(counts, counts_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)


def test_triton_is_the_default_on_cuda_only():
    """Routing and token moves take the Triton kernels on CUDA unless `use_triton` is False,
    on CPU only when forced (as these tests do, in the interpreter)."""
    block = MoE(8, 16, 4, 2)
    assert not block._triton(torch.zeros(1))
    if torch.cuda.is_available():
        assert block._triton(torch.zeros(1, device="cuda"))
        block.use_triton = False
        assert not block._triton(torch.zeros(1, device="cuda"))
    block.use_triton = True
    assert block._triton(torch.zeros(1))
