"""MoE block: parity with a plain per-token reference, losses, capacity, masks, balancing."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from advarch.models.blocks import moe_experts
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.moe_experts import grouped_mm_supported

GROUPED = grouped_mm_supported(torch.float32, "cpu")
TRITON = importlib.util.find_spec("triton") is not None


def expert_reference(moe: MoE, e: int, v: torch.Tensor) -> torch.Tensor:
    """Expert e applied to one token v (D,)."""
    h = v @ moe.w_in[e]
    if moe.activation == "swiglu":
        gate, up = h.chunk(2)
        h = F.silu(gate) * up
    else:
        h = F.gelu(h)
    return h @ moe.w_out[e]


def moe_reference(
    moe: MoE, x: torch.Tensor, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop over tokens and their k experts; returns y (B, T, D) and the aux loss.

    Top-k by probability, gates renormalised over the k (raw probability when k = 1); with a
    capacity, an expert takes the first `capacity` tokens that chose it, in token order.
    """
    tokens = x.reshape(-1, x.shape[-1])
    E, K, N = moe.num_experts, moe.top_k, tokens.shape[0]
    rows, probs, lse = [], [], []
    counts, taken = [0] * E, [0] * E
    for n in range(N):
        logits = moe.router @ tokens[n]
        p = torch.softmax(logits, dim=0)
        probs.append(p)
        lse.append(torch.logsumexp(logits, dim=0))
        top = torch.topk(p, K).indices.tolist()
        total = sum(p[e] for e in top)
        row = torch.zeros_like(tokens[n])
        for e in top:
            counts[e] += 1
            if capacity is not None and taken[e] >= capacity:
                continue
            taken[e] += 1
            gate = p[e] / total if K > 1 else p[e]
            row = row + gate * expert_reference(moe, e, tokens[n])
        if moe.shared is not None:
            row = row + moe.shared(tokens[n])
        rows.append(row)
    mean_p = torch.stack(probs).mean(0)
    balance = E * sum(counts[e] / (N * K) * mean_p[e] for e in range(E))
    z_loss = torch.stack(lse).pow(2).mean()
    aux = moe.balance_loss_weight * balance + moe.z_loss_weight * z_loss
    return torch.stack(rows).reshape(x.shape), aux


def grads_of(module: torch.nn.Module, x: torch.Tensor, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [x, *module.parameters()]
    return list(torch.autograd.grad(loss, params))


def count_grouped_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = moe_experts._GROUPED_MM

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(moe_experts, "_GROUPED_MM", counting)
    return calls


@pytest.mark.parametrize(
    "grouped",
    [
        False,
        pytest.param(
            True, marks=pytest.mark.skipif(not GROUPED, reason="no grouped_mm on this torch/CPU")
        ),
    ],
)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("shared", [0, 2])
def test_matches_per_token_reference(
    grouped: bool, top_k: int, activation: str, shared: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(top_k * 10 + shared)
    moe = MoE(
        16,
        32,
        num_experts=4,
        top_k=top_k,
        activation=activation,
        num_shared_experts=shared,
        shared_hidden=16,
        z_loss_weight=0.1,
        balance_loss_weight=0.5,
    )
    moe.use_grouped_mm = grouped
    ref = copy.deepcopy(moe).double()
    if not grouped:
        moe.double()  # the loop path runs in float64: tight comparison
    dtype = next(moe.parameters()).dtype
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    x_ref, x_fast = x.clone().requires_grad_(True), x.to(dtype).requires_grad_(True)
    calls = count_grouped_calls(monkeypatch)
    y, aux, _ = moe(x_fast)
    assert calls[0] == (2 if grouped else 0)
    y_ref, aux_ref = moe_reference(ref, x_ref)
    tol = {"rtol": 1e-4, "atol": 1e-5} if grouped else {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(y.double(), y_ref, **tol)
    torch.testing.assert_close(aux.double(), aux_ref, **tol)
    cot = torch.randn_like(y_ref)
    fast = grads_of(moe, x_fast, (y * cot.to(dtype)).sum() + aux)
    slow = grads_of(ref, x_ref, (y_ref * cot).sum() + aux_ref)
    for g, g_ref in zip(fast, slow, strict=True):
        torch.testing.assert_close(g.double(), g_ref, **tol)


@pytest.mark.parametrize(("dtype", "hidden"), [(torch.float64, 32), (torch.float32, 6)])
def test_falls_back_to_expert_loop_where_grouped_mm_cannot_run(
    dtype: torch.dtype, hidden: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float64 is rejected by the probe; 6 float32 columns are not 16-byte aligned rows."""
    torch.manual_seed(0)
    moe = MoE(16, hidden, num_experts=4, top_k=2).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    assert grouped_mm_supported(dtype, "cpu") == (dtype != torch.float64 and GROUPED)
    calls = count_grouped_calls(monkeypatch)  # after the (cached) probe
    y, _, _ = moe(x)
    assert calls[0] == 0
    torch.testing.assert_close(y, moe_reference(moe, x)[0])


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_single_expert_top1_equals_dense_ffn(activation: str) -> None:
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=1, top_k=1, activation=activation).double()
    ffn = FeedForward(16, 32, activation).double()
    with torch.no_grad():
        moe.w_in[0].copy_(ffn.w_in.weight.T)
        moe.w_out[0].copy_(ffn.w_out.weight.T)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x)[0], ffn(x))


def test_soft_mode_is_probability_weighted_sum_of_all_experts() -> None:
    torch.manual_seed(1)
    moe = MoE(8, 16, num_experts=3, soft=True).double()
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    y, _, stats = moe(x)
    tokens = x.reshape(-1, 8)
    rows = []
    for v in tokens:
        p = torch.softmax(moe.router @ v, dim=0)
        rows.append(sum(p[e] * expert_reference(moe, e, v) for e in range(3)))
    y_ref = torch.stack(rows).reshape(x.shape)
    torch.testing.assert_close(y, y_ref)
    cot = torch.randn_like(y)
    fast = grads_of(moe, x, (y * cot).sum())
    slow = grads_of(moe, x, (y_ref * cot).sum())
    for g, g_ref in zip(fast, slow, strict=True):
        torch.testing.assert_close(g, g_ref)
    assert stats["dropped"] == 0


def test_balance_loss_is_one_at_uniform_routing_and_z_loss_is_log_e_squared() -> None:
    E = 4
    moe = MoE(E, 8, num_experts=E, top_k=1)
    with torch.no_grad():
        moe.router.zero_()  # zero logits: P_i = 1/E for every expert
    _, _, stats = moe(torch.randn(2, 8, E))
    torch.testing.assert_close(stats["balance_loss"], torch.tensor(1.0))
    torch.testing.assert_close(stats["z_loss"], torch.tensor(math.log(E) ** 2))
    with torch.no_grad():
        moe.router.copy_(10 * torch.eye(E))  # token n → expert n mod E: f and P both uniform
    x = torch.eye(E).repeat(3, 1).unsqueeze(0)  # (1, 12, E)
    _, _, stats = moe(x)
    torch.testing.assert_close(stats["load"], torch.full((E,), 1 / E))
    torch.testing.assert_close(stats["balance_loss"], torch.tensor(1.0))
    _, _, skewed = moe(torch.eye(E)[:1].repeat(12, 1).unsqueeze(0))  # all tokens → expert 0
    assert skewed["balance_loss"] > 3.5  # → E as routing collapses onto one expert


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_keeps_earliest_tokens(seed: int, top_k: int) -> None:
    torch.manual_seed(seed)
    E, N, cf = 4, 24, 0.75
    moe = MoE(8, 16, num_experts=E, top_k=top_k, capacity_factor=cf).double()
    with torch.no_grad():
        moe.router[0] += 1.0  # skew towards expert 0 so it overflows
    x = torch.randn(1, N, 8, dtype=torch.float64) + 1.0
    y, _, stats = moe(x)
    capacity = math.ceil(cf * top_k * N / E)
    y_ref, _ = moe_reference(moe, x, capacity=capacity)
    torch.testing.assert_close(y, y_ref)
    slots = (stats["load"] * N * top_k).round()  # routed slots per expert
    expected = (slots - capacity).clamp(min=0).sum() / (N * top_k)
    assert expected > 0
    torch.testing.assert_close(stats["dropped"], expected.float())


def test_evaluation_never_drops() -> None:
    # a capacity depends on the batch: in eval mode a token's output must not (metrics would
    # change with the batch size, and one-token decoding steps would disagree with the forward)
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, top_k=2, capacity_factor=0.75).double()
    with torch.no_grad():
        moe.router[0] += 1.0  # expert 0 overflows
    x = torch.randn(1, 24, 8, dtype=torch.float64) + 1.0
    assert moe(x)[2]["dropped"] > 0  # training drops
    moe.eval()
    y, _, stats = moe(x)
    torch.testing.assert_close(y, moe_reference(moe, x)[0])
    torch.testing.assert_close(y[:, :5], moe(x[:, :5])[0])
    assert stats["dropped"] == 0


def test_dropless_by_default_drops_nothing() -> None:
    moe = MoE(8, 16, num_experts=4)
    assert moe(torch.randn(2, 9, 8))[2]["dropped"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_masked_experts_are_never_selected(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    E, B, K = 6, 3, 2
    moe = MoE(8, 16, num_experts=E, top_k=K, aux_free_bias=True).double()
    with torch.no_grad():
        moe.routing_bias.fill_(100.0)  # the selection bias must not revive masked experts
    mask = torch.rand(B, E, generator=g) < 0.5
    mask[torch.arange(B), torch.randint(E, (B,), generator=g)] = True
    mask[torch.arange(B), (torch.arange(B) + 1) % E] = True  # ≥ K allowed per row
    x = torch.randn(B, 5, 8, dtype=torch.float64, generator=g)
    y, aux, stats = moe(x, expert_mask=mask)
    assert torch.isfinite(aux) and all(torch.isfinite(v).all() for v in stats.values())
    for b in range(B):
        y_b, _, stats_b = moe(x[b : b + 1], expert_mask=mask[b])
        assert (stats_b["load"][~mask[b]] == 0).all()
        torch.testing.assert_close(y[b : b + 1], y_b)


@pytest.mark.parametrize(
    ("top_k", "capacity_factor", "soft"),
    [(1, None, False), (2, None, False), (1, 1.25, False), (2, 1.25, False), (1, None, True)],
)
def test_an_expert_mask_routes_as_a_moe_of_its_allowed_experts(
    top_k: int, capacity_factor: float | None, soft: bool
) -> None:
    # hunter 39: under a mask, GShard's capacity was computed for all E experts (cf 1.25 with
    # 2 of 8 allowed dropped 69% of the slots, a MoE of those 2 none) and the balance loss
    # read E / allowed = 4 at perfect balance (a router gradient 4× too large)
    torch.manual_seed(0)
    options = dict(top_k=top_k, capacity_factor=capacity_factor, soft=soft)
    big = MoE(16, 32, num_experts=8, **options).train()
    small = MoE(16, 32, num_experts=3, **options).train()
    allowed = [1, 4, 6]
    with torch.no_grad():
        for name in ("router", "w_in", "w_out"):
            getattr(small, name).copy_(getattr(big, name)[allowed])
    mask = torch.zeros(8, dtype=torch.bool)
    mask[allowed] = True
    x = torch.randn(4, 64, 16)
    pad_mask = torch.arange(64) >= torch.tensor([64, 50, 33, 7])[:, None]  # (4, 64)
    y, aux_loss, stats = big(x, pad_mask=pad_mask, expert_mask=mask)
    y_ref, aux_ref, ref = small(x, pad_mask=pad_mask)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(aux_loss, aux_ref)
    for key in ("dropped", "balance_loss", "z_loss", "entropy"):
        torch.testing.assert_close(stats[key], ref[key], msg=key)
    torch.testing.assert_close(stats["load"][allowed], ref["load"])
    gradients = [torch.autograd.grad(loss, moe.router) for loss, moe in
                 ((aux_loss, big), (aux_ref, small))]  # fmt: skip
    torch.testing.assert_close(gradients[0][0][allowed], gradients[1][0])


def test_a_masked_micro_batch_of_padding_alone_drops_nothing() -> None:
    # review 39: it reached no expert, so the capacity divided by 0 (NaN) and the forward raised
    moe = MoE(16, 32, num_experts=8, top_k=2, capacity_factor=1.25).train()
    mask = torch.zeros(8, dtype=torch.bool)
    mask[:2] = True
    x = torch.randn(2, 5, 16)
    y, aux_loss, stats = moe(x, pad_mask=torch.ones(2, 5, dtype=torch.bool), expert_mask=mask)
    assert torch.isfinite(y).all() and torch.isfinite(aux_loss) and stats["dropped"] == 0


def test_mask_allowing_too_few_experts_raises() -> None:
    moe = MoE(8, 16, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="fewer than 2"):
        moe(torch.randn(2, 3, 8), expert_mask=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]).bool())


@pytest.mark.parametrize("aux_free_bias", [False, True])
def test_expert_mask_compiles_to_one_graph_that_matches_eager(aux_free_bias: bool) -> None:
    """`strategy.expert_masks=true` with `model.compile=true`: the mask's check of allowed
    experts per row runs eagerly only (a branch on data splits a compiled graph per MoE
    layer); compiled outputs, statistics and every gradient equal eager's (float64)."""
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, top_k=2, aux_free_bias=aux_free_bias).double()
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]]).bool()
    assert_one_graph_equal_to_eager(moe, expert_mask=mask)


def test_aux_free_bias_moves_load_toward_balance() -> None:
    torch.manual_seed(0)
    E = 4
    moe = MoE(8, 16, num_experts=E, top_k=1, aux_free_bias=True, bias_update_rate=0.01)
    with torch.no_grad():
        moe.router[0] = 0.5  # inputs with positive mean prefer expert 0
    x = torch.randn(4, 16, 8) + 1.0
    loads = []
    for _ in range(120):
        with torch.no_grad():
            loads.append(moe(x)[2]["load"])
        moe.update_routing_bias()
        assert (moe.load_counts == 0).all()  # reset by every update
    recent = torch.stack(loads[-20:]).mean(0)  # sign updates oscillate: average a window
    assert loads[0].max() > 0.9 and recent.max() < 0.45
    assert moe.routing_bias[0] < 0


def test_bf16_autocast_runs_with_float32_router(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, top_k=2, num_shared_experts=1)
    seen = []
    real = moe._router_logits

    def spy(*args):
        out = real(*args)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(moe, "_router_logits", spy)
    x = torch.randn(2, 6, 16, requires_grad=True)
    y32 = moe(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux, _ = moe(x)
    assert y.dtype == torch.bfloat16 and seen == [torch.float32, torch.float32]
    assert aux.dtype == torch.float32
    (y.float().sum() + aux).backward()
    assert moe.router.grad.dtype == torch.float32 and moe.w_in.grad.dtype == torch.float32
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)


def test_router_jitter_only_in_training() -> None:
    moe = MoE(8, 16, num_experts=4, router_jitter=0.5)
    x = torch.randn(2, 16, 8)
    moe.eval()
    torch.testing.assert_close(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe(x)[0], moe(x)[0])


def test_add_experts_keeps_old_experts_and_routing() -> None:
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, top_k=2, aux_free_bias=True).double()
    old = {k: v.clone() for k, v in moe.state_dict().items()}
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    y_old = moe(x)[0]
    moe.add_experts(2)
    assert moe.num_experts == 6 and moe.w_in.shape[0] == 6 and moe.routing_bias.shape == (6,)
    for name in ("router", "w_in", "w_out"):
        torch.testing.assert_close(getattr(moe, name)[:4], old[name])
        assert getattr(moe, name)[4:].abs().sum() > 0
    only_old = torch.tensor([True] * 4 + [False] * 2)
    torch.testing.assert_close(moe(x, expert_mask=only_old)[0], y_old)
    y, _, stats = moe(x)
    y.sum().backward()
    assert stats["load"].shape == (6,) and moe.w_in.grad.shape[0] == 6


@pytest.mark.parametrize("aux_free_bias", [False, True])
def test_expert_tensors_are_every_expert_indexed_tensor(aux_free_bias: bool) -> None:
    moe = MoE(8, 16, num_experts=4, num_shared_experts=1, aux_free_bias=aux_free_bias)
    tensors = moe.expert_tensors()
    bias = ["routing_bias", "load_counts", "fair_counts"] if aux_free_bias else []
    assert list(tensors) == ["router", "w_in", "w_out", *bias]
    assert all(t.shape[0] == 4 for t in tensors.values())
    assert tensors["w_in"] is moe.w_in  # the live tensors, so freezing rows acts on the layer
    moe.add_experts(2)
    assert all(t.shape[0] == 6 for t in moe.expert_tensors().values())


def test_stats_are_detached_and_aux_is_weighted() -> None:
    moe = MoE(8, 16, num_experts=4, balance_loss_weight=0.3, z_loss_weight=0.2)
    _, aux, stats = moe(torch.randn(2, 5, 8))
    assert set(stats) == {"load", "dropped", "entropy", "balance_loss", "z_loss"}
    assert all(not v.requires_grad for v in stats.values())
    torch.testing.assert_close(aux.detach(), 0.3 * stats["balance_loss"] + 0.2 * stats["z_loss"])
    torch.testing.assert_close(stats["load"].sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 9}, "model.moe.top_k=9 exceeds model.moe.num_experts=8"),
        ({"activation": "relu"}, "model.activation='relu'"),
        ({"capacity_factor": 0.0}, "model.moe.capacity_factor=0.0"),
        ({"soft": True, "capacity_factor": 1.0}, "model.moe.capacity_factor=1.0"),
        ({"soft": True, "aux_free_bias": True}, "model.moe.aux_free_bias=True"),
        ({"router_jitter": 1.5}, "model.moe.router_jitter=1.5"),
        ({"num_shared_experts": -1}, "model.moe.num_shared_experts=-1"),
    ],
)
def test_invalid_config_names_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MoE(8, 16, **kwargs)


# ops that read a device value back to the host (.item(), .tolist(), bool(), data-dependent
# shapes): the dropless grouped path must use none of them, forward or backward
HOST_READS = {
    "_local_scalar_dense",
    "nonzero",
    "bincount",
    "masked_select",
    "unique",
    "repeat_interleave",
}


@pytest.mark.skipif(not GROUPED, reason="grouped_mm unavailable")
@pytest.mark.parametrize(
    "triton",
    [False, pytest.param(True, marks=pytest.mark.skipif(not TRITON, reason="no Triton"))],
)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_dropless_path_never_reads_back_to_the_host(activation: str, triton: bool) -> None:
    """Neither with torch's routing and moves nor with the Triton kernels (in the interpreter
    here: its own copies to and from host memory are not dispatched ops)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, top_k=2, activation=activation, aux_free_bias=True).train()
    moe.use_grouped_mm = True  # the accelerator path, on CPU
    moe.use_triton = triton
    x = torch.randn(2, 9, 16, requires_grad=True)
    with Ops() as ops:
        y, aux, _ = moe(x)
        (y.sum() + aux).backward()
    assert "_grouped_mm" in ops.names or "grouped_mm" in ops.names
    assert ("topk" in ops.names) != triton  # the Triton kernels route without torch's topk
    assert not ops.names & HOST_READS
    torch.testing.assert_close(y, moe_reference(moe, x)[0])


@pytest.mark.parametrize(
    ("grouped", "triton"),
    [
        (False, False),
        pytest.param(True, False, marks=pytest.mark.skipif(not GROUPED, reason="no grouped_mm")),
        pytest.param(True, True, marks=pytest.mark.skipif(
            not (GROUPED and TRITON), reason="no grouped_mm or Triton")),
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    "frozen", [("w_in",), ("w_out",), ("w_in", "w_out"), ("router", "x"), ("x", "w_in", "w_out")]
)
def test_dropless_gradients_with_frozen_inputs(
    grouped: bool, triton: bool, frozen: tuple[str, ...]
) -> None:
    """The dispatch's hand-written backward (and the Triton routing's) skips gradients nobody
    asked for (frozen experts, a frozen input) and gives the others exactly as when
    everything trains."""
    torch.manual_seed(len(frozen))
    moe = MoE(16, 32, num_experts=4, top_k=2, activation="swiglu")
    moe.use_grouped_mm, moe.use_triton = grouped, triton
    x = torch.randn(2, 7, 16, requires_grad=True)
    y, aux, _ = moe(x)
    cot = torch.randn_like(y)
    tensors = {"x": x, **dict(moe.named_parameters())}
    loss = (y * cot).sum() + aux
    full = dict(zip(tensors, torch.autograd.grad(loss, list(tensors.values())), strict=True))
    for name in frozen:
        tensors[name].requires_grad_(False)
    y, aux, _ = moe(x)
    trained = {k: t for k, t in tensors.items() if t.requires_grad}
    grads = torch.autograd.grad((y * cot).sum() + aux, list(trained.values()))
    for name, g in zip(trained, grads, strict=True):
        torch.testing.assert_close(g, full[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("device", "backend"),
    [
        pytest.param("cpu", "aot_eager", marks=pytest.mark.skipif(
            not grouped_mm_supported(torch.bfloat16, "cpu"), reason="no bf16 grouped_mm on CPU"
        )),
        pytest.param("cuda", "inductor", marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs CUDA"
        )),
    ],
)  # fmt: skip
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_compiles_to_one_graph_that_matches_eager(device: str, backend: str, activation: str):
    """torch.compile traces the dropless grouped path whole (the grouped_mm probe is a graph
    constant, the alignment checks trace, the dispatch's autograd node is traced with its
    backward): `fullgraph=True` raises on any graph break. Outputs and gradients match eager
    under bf16 autocast (on CPU `aot_eager` runs the traced graphs; on CUDA Inductor)."""
    torch.manual_seed(0)
    moe = MoE(32, 64, num_experts=8, top_k=2, activation=activation).to(device)
    moe.use_grouped_mm = True
    compiled = torch.compile(moe, backend=backend, fullgraph=True)
    x = torch.randn(2, 16, 32, device=device)
    results = []
    for module in (compiled, moe):
        inp = x.clone().requires_grad_(True)
        with torch.autocast(device, dtype=torch.bfloat16):
            y, aux, stats = module(inp)
        grads = torch.autograd.grad(y.float().sum() + aux, [inp, *moe.parameters()])
        results.append((y.float(), aux, stats["load"], *grads))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_loop_path_compiles_to_one_graph_that_matches_eager(
    activation: str, capacity_factor: float | None
) -> None:
    """Under torch.compile (default options, as `model.compile` uses) the CPU loop over experts
    is one operator (`expert_mlp_loop`): it reads the counts inside, so the graph does not break
    (a break in a model's layer loop makes torch.compile leave the whole model eager); with a
    capacity every slot runs and dropped ones are gated 0. float64, outputs and every gradient
    equal eager's."""
    torch.manual_seed(0)
    moe = MoE(16, 32, num_experts=4, top_k=2, activation=activation,
              capacity_factor=capacity_factor).double()  # fmt: skip
    moe.use_grouped_mm = False
    assert_one_graph_equal_to_eager(moe)


def assert_one_graph_equal_to_eager(moe: MoE, **kwargs: torch.Tensor) -> None:
    """`moe` (float64, 16 wide) compiled with `aot_eager` is one graph whose outputs, load,
    dropped share and every gradient equal eager's on a (2, 9) batch."""
    graphs = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(moe, backend=graphs)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    results = []
    for module in (compiled, moe):
        inp = x.clone().requires_grad_(True)
        y, aux, stats = module(inp, **kwargs)
        grads = torch.autograd.grad((y * y).sum() + aux, [inp, *moe.parameters()])
        results.append((y, aux, stats["load"], stats["dropped"], *grads))
    assert graphs.frame_count == 1
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_expert_loop_operator_equals_autograd_composition(activation: str) -> None:
    """`expert_mlp_loop` (the compiled loop path) and its written-out backward against the
    eager loop recorded by autograd: outputs and gradients, an expert with no rows, frozen
    weights; torch.library.opcheck checks its fake shapes and autograd registration."""
    torch.manual_seed(1)
    counts = torch.tensor([3, 0, 5, 2])
    width = 12 if activation == "swiglu" else 6
    xs, w_in, w_out = (torch.randn(*shape, dtype=torch.float64, requires_grad=True)
                       for shape in ((10, 8), (4, 8, width), (4, 6, 8)))  # fmt: skip
    cot = torch.randn(10, 8, dtype=torch.float64)
    want = moe_experts.expert_mlp(xs, w_in, w_out, counts, False, activation)
    got = moe_experts.expert_mlp_loop(xs, w_in, w_out, counts, activation)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for trains in ((True, True, True), (True, False, True), (False, True, False)):
        pairs = zip((xs, w_in, w_out), trains, strict=True)
        inputs = [t if train else t.detach() for t, train in pairs]
        trained = [t for t in inputs if t.requires_grad]
        want_grads = torch.autograd.grad(want, trained, cot, retain_graph=True)
        out = moe_experts.expert_mlp_loop(*inputs, counts, activation)[0]
        for g, w in zip(torch.autograd.grad(out, trained, cot), want_grads, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(moe_experts.expert_mlp_loop, (xs, w_in, w_out, counts, activation))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_and_backward_do_not_synchronise() -> None:
    torch.manual_seed(0)
    moe = MoE(64, 128, num_experts=8, top_k=2, activation="swiglu").cuda()
    x = torch.randn(4, 32, 64, device="cuda", requires_grad=True)
    ref = moe_reference(moe.cpu(), x.detach().cpu())[0]
    moe.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        moe(x)  # warm-up under the same dtype: the grouped_mm probe synchronises, once
    assert grouped_mm_supported(torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux, _ = moe(x)
        (y.float().sum() + aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(y.float().cpu(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("soft", [False, True])
def test_padding_counts_in_no_loss_or_statistic(soft: bool) -> None:
    # padding tokens were routed like the others: they moved the balance loss, z-loss, load
    # and entropy (HF Mixtral's balance loss leaves them out with its attention mask)
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, top_k=2, soft=soft).eval()
    real = torch.randn(2, 5, 8)
    padded = torch.cat([torch.randn(2, 3, 8), real], dim=1)  # 3 padding tokens first
    pad = torch.arange(8).expand(2, 8) < 3
    y, aux, stats = moe(padded, pad_mask=pad)
    want_y, want_aux, want_stats = moe(real)
    torch.testing.assert_close(y[:, 3:], want_y)  # each token's output is its own
    torch.testing.assert_close(aux, want_aux)
    for key, value in want_stats.items():
        torch.testing.assert_close(stats[key], value, msg=key)


def test_padding_takes_no_experts_capacity() -> None:
    # padding first in token order took the capacity the real tokens after it needed
    torch.manual_seed(1)
    real = torch.randn(1, 8, 8)
    padded = torch.cat([torch.randn(1, 8, 8), real], dim=1)
    pad = torch.arange(16)[None] < 8
    # capacity ceil(cf · K · N / E) over the N = 8 real tokens: 2 token-slots per expert in
    # both batches (the padding counted in N gave the real tokens twice as many)
    moe = MoE(8, 16, num_experts=4, top_k=2, capacity_factor=0.5).train()
    y, aux, stats = moe(padded, pad_mask=pad)
    want_y, want_aux, want_stats = moe(real)
    assert want_stats["dropped"] > 0  # capacity binds
    torch.testing.assert_close(y[:, 8:], want_y)
    torch.testing.assert_close(stats["dropped"], want_stats["dropped"])
    torch.testing.assert_close(stats["load"], want_stats["load"])


def test_aux_free_bias_balances_the_allowed_experts_under_an_expert_mask() -> None:
    # DeepSeek-V3's rule nudges an expert's bias by sign(mean load − its load): overloaded
    # experts lose selection bias, underloaded ones gain it, until the tokens spread evenly over
    # the experts they can be routed to. Under an expert mask (continual expert_masks=true:
    # task t's block of experts) the masked-out experts take no token by construction, yet
    # their zero counts pulled the mean down: both allowed experts counted as "overloaded",
    # both biases fell in lockstep, and a 73/27 split between them was never corrected (the
    # same router over just those two experts, unmasked, balances to ~50/50).
    def recent_load(num_experts: int, mask: torch.Tensor | None) -> torch.Tensor:
        torch.manual_seed(0)
        moe = MoE(8, 16, num_experts=num_experts, top_k=1, aux_free_bias=True,
                  bias_update_rate=0.01)  # fmt: skip
        with torch.no_grad():
            moe.router.zero_()
            moe.router[0] = 0.25  # inputs with positive mean prefer expert 0
        x = torch.randn(4, 32, 8) + 1.0
        loads = []
        for _ in range(200):
            with torch.no_grad():
                loads.append(moe(x, expert_mask=mask)[2]["load"])
            moe.update_routing_bias()
        return torch.stack(loads[-40:]).mean(0)  # sign updates oscillate: average a window

    alone = recent_load(2, None)
    assert alone.max() < 0.6  # the reference: two experts, no mask, balanced
    masked = recent_load(4, torch.tensor([True, True, False, False]))
    assert masked[2:].sum() == 0
    assert masked[:2].max() < 0.6, f"allowed experts stay unbalanced: {masked[:2].tolist()}"


def test_added_experts_are_open_where_some_experts_are_closed() -> None:
    # review 37: `open_experts` (E,) is an expert tensor like the routing bias, but
    # `add_experts` grows only the parameters and the bias: the next forward failed on
    # `expert_mask & open_experts` with (E + n,) and (E,) shapes
    torch.manual_seed(0)
    moe = MoE(8, 16, num_experts=4, top_k=1)
    moe.open_experts = torch.tensor([True, True, True, False])
    moe.add_experts(2)
    assert moe.open_experts.tolist() == [True, True, True, False, True, True]
    mask = torch.tensor([False, False, False, False, True, True])
    _, _, stats = moe(torch.randn(2, 3, 8), expert_mask=mask)
    assert stats["load"][:4].sum() == 0
