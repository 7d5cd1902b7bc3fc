"""Training FLOPs per token of any advarch model, for throughput and MFU.

The usual count (Kaplan et al. 2020; PaLM, Chowdhery et al. 2022, appendix B): a weight used
in one multiply-add per token costs 2 FLOPs forward and 4 backward, so training spends
6 · P FLOPs per token on P matmul weights, plus 12 · D · ctx per token for each attention
layer's scores and weighted values (ctx = keys a query sees: T for full attention, the window
for sliding-window attention, the source's T for a seq2seq decoder's cross-attention; a
seq2seq model's tokens are its source's, as many as its targets' in the shipped tasks). MoE
experts count only the K of E a token is routed to (all E for a soft mixture); embedding
lookups are free, a tied output head counts once as a matmul.
RETRO's neighbour encoder runs on K·R neighbour tokens per chunk of m decoder tokens, so its
weights (and CCA's keys and values) count K·R/m times per decoder token, with the attention
of the encoder (over R and over the chunk's m) and of CCA (over K·R). Mamba-2's chunked SSD
is matmuls too (`ssd_chunked`: its multiply-adds per token below, 6 FLOPs each); an MMoE's
experts, gates and towers are einsums over its weights, plus each gate's mix of the experts.
Mamba's selective scan, norms and activations are elementwise and left out, as in those papers.
A frozen weight (a fine-tune's base) costs 2 forward, and 2 more only where the backward
passes through it on its way to a trained tensor before it; it needs no gradient of its own.
"""

from __future__ import annotations

from torch import nn

from advarch.models.blocks.attention import Attention
from advarch.models.blocks.moe import MoE
from advarch.models.blocks.sliding_window import SlidingWindowAttention
from advarch.models.blocks.ssd import Mamba2
from advarch.models.layers import Layer
from advarch.models.mmoe import MultiGateMoE
from advarch.models.model import FeaturePatches
from advarch.models.retro_lm import RetroAdapter


def _weight_multiply_adds(module: nn.Module, rates: dict[int, float]) -> tuple[float, float]:
    """(all, trained) multiply-adds per token through `module`'s own weights: MoE experts
    scaled by the routed fraction, RETRO's by the neighbour tokens they see per decoder token;
    0 for modules without matmul weights (embedding lookups are free)."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        parts = [(rates.get(id(module), 1.0), module.weight)]
    elif isinstance(module, MoE):
        active = 1.0 if module.soft else module.top_k / module.num_experts
        parts = [(1.0, module.router), (active, module.w_in), (active, module.w_out)]
    elif isinstance(module, MultiGateMoE):  # per example; every expert runs on each
        parts = [(1.0, w) for w in (module.expert_in, module.tower_in, module.tower_out)]
        if module.gate is not None:  # its weights, and each gate's sum of the experts' outputs
            mix = module.gate.shape[0] * module.expert_bias.numel()
            parts.append((1.0 + mix / module.gate.numel(), module.gate))
    else:
        return 0.0, 0.0
    return (
        sum(r * w.numel() for r, w in parts),
        sum(r * w.numel() for r, w in parts if w.requires_grad),
    )


def _product_multiply_adds(module: nn.Module, seq_len: int, retro: set[int]) -> float:
    """Multiply-adds per token between activations in `module` (no weights): attention's
    scores and weighted values, Mamba-2's chunked SSD, a RETRO adapter's attention."""
    if isinstance(module, (Attention, SlidingWindowAttention)) and id(module) not in retro:
        return 2 * module.num_heads * module.head_dim * _attention_context(module, seq_len)
    if isinstance(module, Mamba2):
        return _ssd_multiply_adds(module, seq_len)
    if isinstance(module, RetroAdapter):
        return _retrieval_attention(module) / 6
    return 0.0


def _ssd_multiply_adds(m: Mamba2, seq_len: int) -> float:
    """Multiply-adds per token of a Mamba-2 layer's chunked SSD at chunks of L = min(chunk,
    T), c = ⌈T / L⌉ of them, inner width I, state N: C Bᵀ within a chunk (L·N), its weighted
    sum of x (I·L), each chunk's state (I·N), the recurrence over the c + 1 chunk states
    ((c + 1)²·I·N per sequence) and the carried states' share of the outputs (I·N)."""
    L = min(m.chunk_size, seq_len)
    chunks = -(-seq_len // L)
    inner, N = m.inner, m.d_state
    return L * N + inner * L + 2 * inner * N + (chunks + 1) ** 2 * inner * N / seq_len


def _neighbour_rates(model: nn.Module) -> dict[int, float]:
    """RETRO's linears that run on neighbour tokens, by id: K·R/m of them per decoder token (the
    encoder's, but for its cross-attention keys and values, of the chunk's m states; CCA's
    keys and values)."""
    rates: dict[int, float] = {}
    for adapter in (m for m in model.modules() if isinstance(m, RetroAdapter)):
        per_token = adapter.neighbours * adapter.neighbour_len / adapter.encoder.chunk_size
        encoder = [m for m in adapter.encoder.modules() if isinstance(m, nn.Linear)]
        rates |= dict.fromkeys(map(id, encoder), per_token)
        rates |= {id(layer.cross_attn.to_kv): 1.0 for layer in adapter.encoder.layers}
        rates |= {id(cca.attn.to_kv): per_token for cca in adapter.cca.values()}
    return rates


def _retrieval_attention(adapter: RetroAdapter) -> float:
    """A RETRO adapter's attention FLOPs per decoder token: the encoder's self-attention over a
    neighbour's R tokens and cross-attention over its chunk's m, for K·R/m neighbour tokens,
    and each CCA sub-layer's over the K·R neighbour tokens."""
    k, r, m = adapter.neighbours, adapter.neighbour_len, adapter.encoder.chunk_size
    dim = adapter.encoder.layers[0].self_attn.to_q.in_features
    encoder = len(adapter.encoder.layers) * 12 * dim * (r + m) * k * r / m
    return encoder + len(adapter.cca) * 12 * dim * k * r


def _attention_context(module: nn.Module, seq_len: int) -> int:
    """Keys each query attends: its window, else the sequence (a seq2seq decoder's
    cross-attention: the source, whose tokens are the ones counted)."""
    if isinstance(module, SlidingWindowAttention):
        w = module.window if module.causal else 2 * (module.window // 2) + 1
        return min(w, seq_len)
    return seq_len


def feature_tokens(model: nn.Module) -> int:
    """Tokens one feature-vector example becomes in `model` (⌈F/p⌉ patches), 1 without
    patches: the sequence length its throughput and FLOPs count."""
    patches = next((m for m in model.modules() if isinstance(m, FeaturePatches)), None)
    return 1 if patches is None else patches.position.shape[0]


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward + backward FLOPs per token at sequence length ``seq_len``, in forward order: a
    trained weight's multiply-add 6 FLOPs; a frozen one's 2 forward, plus 2 for its input's
    gradient where a trained tensor lies before it (a frozen base's layers below the first
    trained one run forward only); the products of activations (attention, SSD) 2 forward,
    plus 4 backward where the gradient passes through them."""
    retro = {id(m) for a in model.modules() if isinstance(a, RetroAdapter) for m in a.modules()}
    rates = _neighbour_rates(model)
    total, flowing = 0.0, False  # (flowing: a trained tensor lies before, so gradients flow)
    for module in _forward_order(model):
        weights, trained = _weight_multiply_adds(module, rates)
        total += 6 * trained + (2 + 2 * flowing) * (weights - trained)
        products = _product_multiply_adds(module, seq_len, retro)
        if products:
            passes = flowing or any(p.requires_grad for p in module.parameters())
            total += (2 + 4 * passes) * products
        flowing = flowing or any(p.requires_grad for p in module.parameters(recurse=False))
    return total


def _forward_order(model: nn.Module) -> list[nn.Module]:
    """`model`'s modules in the order its forward reaches them: registration order, but a
    layer's norm before its sub-layer (mixer, cross-attention, FFN) and a RETRO adapter's
    encoder and CCA sub-layers between the mixer and the FFN of their decoder layers."""
    adapter = next((m for m in model.modules() if isinstance(m, RetroAdapter)), None)
    inserted: dict[int, list[nn.Module]] = {}  # a decoder layer → what runs after its mixer
    if adapter is not None and isinstance(getattr(model, "layers", None), nn.ModuleList):
        for i in adapter.cca_layers:
            first = [adapter, adapter.encoder] if i == adapter.cca_layers[0] else []
            inserted[id(model.layers[i])] = [*first, adapter.cca_norm[str(i)], adapter.cca[str(i)]]
    order: dict[int, nn.Module] = {}

    def visit(module: nn.Module | None) -> None:
        if module is None or id(module) in order:
            return
        order[id(module)] = module
        if isinstance(module, RetroAdapter):
            return  # (its parts: where the decoder runs them)
        if isinstance(module, Layer):
            parts = [module.mixer_norm, module.mixer, module.cross_norm, module.cross,
                     *inserted.get(id(module), []), module.ffn_norm, module.ffn]  # fmt: skip
        else:
            parts = list(module.children())
        for part in parts:
            visit(part)

    visit(model)
    for module in model.modules():  # (a project's own layer with other parts: in registration)
        visit(module)
    return list(order.values())
