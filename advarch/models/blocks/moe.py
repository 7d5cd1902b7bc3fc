"""Mixture-of-Experts feed-forward block with token-choice top-k or soft routing.

Implements:
- Top-k token-choice routing (Shazeer et al. 2017; Mixtral): softmax over the router logits,
  keep the k largest, renormalise the k gates to sum to one. For k = 1 the gate is the raw
  probability p_i (Switch Transformer, Fedus et al. 2021, eq. 2): renormalising a single gate
  gives the constant 1 and would cut the router off from the task gradient.
- Soft (dense) mixture: y = Σ_i p_i(x) · E_i(x), every expert sees every token.
- Switch load-balancing loss (Fedus et al. 2021, eq. 4): L_bal = E · Σ_i f_i · P_i, with f_i
  the fraction of routed token-slots sent to expert i (top-k assignments divided by K, so
  Σ f = 1) and P_i the mean router probability of expert i over the full softmax. Our
  convention equals 1.0 at perfect balance (Mixtral's `load_balancing_loss_func` equals K).
- Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): L_z = mean_tokens (logsumexp(logits))².
- Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024): a per-expert bias added to
  the scores for top-k *selection* only; `update_routing_bias` moves it by
  rate · sign(fair_load − load) once per optimizer step. The fair load is the mean load where
  every expert is open to every token; under an expert mask, each token's K slots shared
  among the experts open to it (a masked-out expert's zero load is its fair load: counting
  it in a mean made every allowed expert look overloaded, and they never balanced).
- GShard capacity (Lepikhin et al. 2020): C = ceil(cf · K · N / E) token-slots per expert, N
  the real tokens (padding is none), E the experts they may reach (under a mask, the allowed
  ones; so is the balance loss's N of experts).

Shapes: B batch, T time, N = B·T tokens, D model dim, H expert hidden (2H for SwiGLU's fused
gate and up projections), E experts, K experts per token, S = kept token-slots (≤ N·K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from advarch.models.blocks.config import BlockConfig, Checks, ModelShape
from advarch.models.blocks.ffn import FeedForward
from advarch.models.blocks.moe_experts import (
    DroplessExperts,
    activate,
    combine,
    expert_mlp,
    expert_offsets,
    gather_rows,
    grouped_mm_runs,
)
from advarch.models.blocks.triton_modules import triton_module


class Routing(NamedTuple):
    """Top-k routing of N tokens to E experts, K each: what `MoE._route` gives its dispatch."""

    expert: torch.Tensor  # (N, K) int64 chosen experts, highest (biased) score first
    gates: torch.Tensor  # (N, K) float32 mixing weights
    counts: torch.Tensor  # (E,) integer token-slots per expert
    offsets: torch.Tensor  # (E,) int32 end of each expert's block of slots in expert order
    order: torch.Tensor  # (N·K,) slots n·K + k sorted by expert, then by slot (stable)
    inverse: torch.Tensor  # (N·K,) each slot's place in `order`
    aux_loss: torch.Tensor  # () balance_loss_weight · balance + z_loss_weight · z-loss
    load: torch.Tensor  # (E,) fraction of token-slots per expert
    entropy: torch.Tensor  # () mean router entropy
    balance: torch.Tensor  # () Switch balance loss, 1.0 at perfect balance
    z_loss: torch.Tensor  # () mean squared logsumexp of the logits
    routed: torch.Tensor | None = None  # (E,) slots of real tokens per expert (None: = counts)
    reach: torch.Tensor | None = None  # () experts the real tokens may reach (None: all E)


class MoE(nn.Module):
    """Mixture-of-Experts FFN: router, stacked experts, optional shared experts.

    Expert weights are stacked on dim 0 (`w_in` (E, D, H or 2H), `w_out` (E, H, D)), so
    merging and continual-learning code can address expert i as `w_in[i]`, `w_out[i]`.
    Dispatch sorts token-slots by expert (stable) and runs the experts on their contiguous
    blocks (`moe_experts`): one grouped matmul (`torch.nn.functional.grouped_mm`) on
    accelerators, a loop of E dense matmuls on CPU. Dropless, tokens move to expert order and
    back by gathers; with a capacity, the kept slots' gated outputs are added back by `index_add`.

    Capacity (when `capacity_factor` is set, in training): within each expert, token-slots are
    kept in flattened (B·T) token order, so the earliest tokens win regardless of whether the
    expert was their first or second choice; dropped slots contribute zero (the caller's
    residual carries the token). In eval mode the block is dropless, so a token's output never
    depends on the other tokens of its batch: metrics do not change with the batch size, and
    cached decoding (one token per step) equals the full forward.

    `use_grouped_mm` (None = the device's default above) may be set True or False to force a
    path; so may `use_triton` (None = on CUDA): routing and the dropless token moves as Triton
    kernels (`moe_routing_triton`, `moe_permute_triton`) instead of torch ops.
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 8,
        top_k: int = 2,
        activation: str = "gelu",
        num_shared_experts: int = 0,
        shared_hidden: int | None = None,
        capacity_factor: float | None = None,
        soft: bool = False,
        router_jitter: float = 0.0,
        balance_loss_weight: float = 0.01,
        z_loss_weight: float = 0.001,
        aux_free_bias: bool = False,
        bias_update_rate: float = 1e-3,
        dropout: float = 0.0,
    ) -> None:
        """Build the router, experts and shared experts.

        Args:
            dim: model width D.
            hidden: hidden width H of each routed expert (fine-grained MoE: more, narrower).
            num_experts: routed experts E.
            top_k: experts per token K (ignored when `soft`).
            activation: "gelu" (GELU MLP) or "swiglu".
            num_shared_experts: always-on experts, fused into one FeedForward of width
                `num_shared_experts · shared_hidden` (the sum of n MLPs equals one wider MLP).
            shared_hidden: hidden width of each shared expert; defaults to `hidden`.
            capacity_factor: None = dropless; else slots per expert C = ceil(cf · K · N / E),
                N the tokens that are not padding, E the experts they may reach.
            soft: dense mixture weighted by the full softmax instead of top-k.
            router_jitter: ε of the multiplicative U(1−ε, 1+ε) noise on router inputs in training.
            balance_loss_weight: weight of the Switch balance loss in `aux_loss`.
            z_loss_weight: weight of the router z-loss in `aux_loss`.
            aux_free_bias: DeepSeek-V3 selection bias; call `update_routing_bias` per step.
            bias_update_rate: step size of the selection-bias update.
            dropout: dropout on the routed output (shared experts apply their own).

        Raises:
            ValueError: naming the `model.moe.<key>` that is invalid.
        """
        super().__init__()
        config = MoEConfig(
            num_experts=num_experts,
            top_k=top_k,
            num_shared_experts=num_shared_experts,
            shared_hidden=shared_hidden,
            capacity_factor=capacity_factor,
            soft=soft,
            router_jitter=router_jitter,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
            aux_free_bias=aux_free_bias,
            bias_update_rate=bias_update_rate,
        )
        config.validate(
            ModelShape(dim=dim, ffn_hidden=hidden, activation=activation, dropout=dropout)
        )
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.activation, self.soft, self.capacity_factor = activation, soft, capacity_factor
        self.router_jitter, self.bias_update_rate = router_jitter, bias_update_rate
        self.balance_loss_weight, self.z_loss_weight = balance_loss_weight, z_loss_weight
        self.use_grouped_mm: bool | None = None
        self.use_triton: bool | None = None
        self.in_mult = 2 if activation == "swiglu" else 1
        self.router = nn.Parameter(torch.empty(num_experts, dim))  # (E, D)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, hidden * self.in_mult))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        for p in (self.router, self.w_in, self.w_out):
            _init_stacked_(p)
        self.shared = None
        if num_shared_experts:
            width = num_shared_experts * (shared_hidden or hidden)
            self.shared = FeedForward(dim, width, activation, dropout)
        self.dropout = nn.Dropout(dropout)
        bias = torch.zeros(num_experts) if aux_free_bias else None
        self.register_buffer("routing_bias", bias)
        self.register_buffer("load_counts", None if bias is None else bias.clone(), False)
        self.register_buffer("fair_counts", None if bias is None else bias.clone(), False)
        # (E,) bool, the experts routing may use (None: all); set by a training setup that
        # trains only some (continual expert masks: experts no task owns are closed)
        self.register_buffer("open_experts", None, False)

    def forward(
        self,
        x: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        pad_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Route tokens, run experts, return output, weighted aux loss and detached stats.

        1. Router logits in float32 (autocast off); disallowed experts get −inf.
        2. Soft: mix all experts by the full softmax. Top-k (`_route`, Triton kernels on
           CUDA): select (with the aux-free bias), gate, order token-slots by expert; then
           drop beyond capacity, run the experts (grouped matmul) and gather back.
        3. Add the shared experts; balance loss, z-loss, entropy, load.

        Args:
            x: (B, T, D) tokens.
            expert_mask: bool (E,) or (B, E) per sequence, True = expert allowed.
            pad_mask: bool (B, T), True at padding: padding tokens are routed like the others
                (their outputs are the caller's to ignore) but count in no loss or statistic
                and take no expert's capacity (as HF Mixtral's balance loss with its
                attention mask).

        Returns:
            y (B, T, D), in the autocast dtype under autocast; aux_loss, a float32 scalar;
            detached stats: `load` (E,) fraction of token-slots the router sent to each
            expert (before capacity dropping; soft mode: mean probability), `dropped`
            fraction of slots dropped, `entropy` mean router entropy, `balance_loss`, `z_loss`.
        """
        B, T, D = x.shape
        xf = x.reshape(B * T, D)  # (N, D)
        allowed = self._allowed(expert_mask, B, T)  # (N, E) bool or None
        real = None if pad_mask is None else ~pad_mask.reshape(B * T)  # (N,) False at padding
        logits = self._router_logits(xf, allowed)  # (N, E) float32
        if self.soft:
            probs = logits.softmax(-1)  # (N, E)
            y, dropped = self._soft_mixture(xf, probs), None
            load, reach = _token_mean(probs, real), _reach(allowed, real)
            losses = self._losses(logits, probs, load, real, reach)
            aux_loss, load, entropy, balance, z_loss = losses
        else:
            route = self._route(logits, allowed, real)
            if self.training and self.load_counts is not None:
                self._count_load(route, allowed, real)
            y, dropped = self._routed(xf, route)
            aux_loss, load, entropy = route.aux_loss, route.load, route.entropy
            balance, z_loss = route.balance, route.z_loss
        y = self.dropout(y).reshape(B, T, D)
        if self.shared is not None:
            y = y + self.shared(x)
        stats = {
            "load": load.detach(),
            "dropped": load.new_zeros(()) if dropped is None else dropped.detach().float(),
            "entropy": entropy.detach(),
            "balance_loss": balance.detach(),
            "z_loss": z_loss.detach(),
        }
        return y, aux_loss, stats

    def _allowed(self, expert_mask: torch.Tensor | None, B: int, T: int) -> torch.Tensor | None:
        """Expand an (E,) or (B, E) mask, and the open experts, to (N, E) tokens; reject rows
        allowing < K experts (in eager mode: a value test is a branch on data, which breaks a
        compiled graph)."""
        if self.open_experts is not None:
            open_experts = self.open_experts
            expert_mask = open_experts if expert_mask is None else expert_mask & open_experts
        if expert_mask is None:
            return None
        E, need = self.num_experts, 1 if self.soft else self.top_k
        if expert_mask.dtype != torch.bool or expert_mask.shape not in ((E,), (B, E)):
            raise ValueError(f"expert_mask must be bool of shape ({E},) or ({B}, {E})")
        if not torch.compiler.is_compiling() and (expert_mask.sum(-1) < need).any():
            raise ValueError(f"expert_mask allows fewer than {need} experts in some row")
        return expert_mask.expand(B, E).repeat_interleave(T, dim=0)  # (N, E)

    def _router_logits(self, xf: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """Router logits in float32 even under autocast, with Switch input jitter in training."""
        with torch.autocast(xf.device.type, enabled=False):
            xr = xf if xf.dtype == torch.float64 else xf.float()  # fp32, or fp64 if given
            if self.training and self.router_jitter > 0:
                eps = self.router_jitter
                xr = xr * torch.empty_like(xr).uniform_(1.0 - eps, 1.0 + eps)
            logits = F.linear(xr, self.router.to(xr.dtype))  # (N, E)
        return logits if allowed is None else logits.masked_fill(~allowed, float("-inf"))

    def _route(self, logits: torch.Tensor, allowed: torch.Tensor | None,
               real: torch.Tensor | None = None) -> Routing:  # fmt: skip
        """Top-k selection, gates, expert counts, the weighted aux loss and statistics; `real`
        (N,) is False at padding tokens, which count in neither loss nor load and come last in
        each expert's block (so capacity keeps the real tokens).

        With `_triton` (CUDA, eager, Triton installed), float32 logits, up to 512 experts (a
        token's logits fit on chip) and no padding mask (packed text has none), Triton kernels
        do it all (`moe_routing_triton`: the
        block was bound by per-op host overhead there); elsewhere this composition of torch
        ops, their plain reference. The renormalised top-k probabilities are the softmax of
        the chosen logits (the same numbers, fewer ops); counts come from a scatter-add
        (bincount would read its maximum back to the host).
        """
        N, K, E = logits.shape[0], self.top_k, self.num_experts
        fusable = real is None and allowed is None and logits.dtype == torch.float32 and E <= 512
        if fusable and self._triton(logits):
            fused = triton_module("moe_routing_triton").FusedRouting.apply
            weights = (self.balance_loss_weight, self.z_loss_weight)
            return Routing(*fused(logits, self.routing_bias, K, weights))
        probs = logits.softmax(-1)  # (N, E)
        with torch.no_grad():
            scores = probs if self.routing_bias is None else probs + self.routing_bias
            if allowed is not None:  # the bias must not revive a masked expert
                scores = scores.masked_fill(~allowed, float("-inf"))
            expert = scores.topk(K, dim=-1).indices  # (N, K)
        gates = logits.gather(1, expert).softmax(-1) if K > 1 else probs.gather(1, expert)
        flat = expert.reshape(-1)
        counts = _bincount(flat, None, E)  # (E,)
        routed = counts if real is None else _bincount(flat, real.repeat_interleave(K), E)
        key = flat if real is None else flat * 2 + (~real).repeat_interleave(K)  # padding last
        order = key.argsort(stable=True)
        inverse = torch.empty_like(order).scatter_(
            0, order, torch.arange(N * K, device=order.device)
        )
        load = routed.to(probs.dtype) / routed.sum().clamp(min=1)
        reach = _reach(allowed, real)
        losses = self._losses(logits, probs, load, real, reach)
        offsets = expert_offsets(counts)
        return Routing(expert, gates, counts, offsets, order, inverse, *losses, routed=routed,
                       reach=reach)  # fmt: skip

    def _losses(self, logits: torch.Tensor, probs: torch.Tensor, load: torch.Tensor,
                real: torch.Tensor | None, reach: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """(aux loss, load, entropy, balance loss, z-loss) of the router's softmax `probs`, means
        over the `real` tokens (all without a padding mask); the balance loss scaled by the
        experts the tokens may reach (`_reach`), so it is 1.0 at perfect balance under a mask too
        (Fedus et al. 2021, eq. 4: N experts)."""
        experts = self.num_experts if reach is None else reach
        balance = experts * torch.dot(load.detach(), _token_mean(probs, real))
        z_loss = _token_mean(torch.logsumexp(logits, -1).square(), real)
        aux_loss = self.balance_loss_weight * balance + self.z_loss_weight * z_loss
        with torch.no_grad():
            entropy = _token_mean(torch.special.entr(probs).sum(-1), real)
        return aux_loss, load, entropy, balance, z_loss

    @torch.no_grad()
    def _count_load(self, route: Routing, allowed: torch.Tensor | None,
                    real: torch.Tensor | None) -> None:  # fmt: skip
        """Add the batch's real token-slots per expert to `load_counts`, and their fair share
        to `fair_counts`: equal among all experts, or each token's K slots equal among the
        experts its mask allows."""
        routed = route.counts if route.routed is None else route.routed  # (E,)
        self.load_counts += routed
        if allowed is None:
            self.fair_counts += routed.sum() / self.num_experts
            return
        share = allowed / allowed.sum(-1, keepdim=True)  # (N, E): rows sum to 1
        if real is not None:
            share = share * real.unsqueeze(-1)
        self.fair_counts += self.top_k * share.sum(0)

    def _routed(self, xf: torch.Tensor, route: Routing) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every token through its chosen experts: y (N, D) and the dropped fraction of slots.

        Dropless (the default) never reads a value back to the host: the experts' row
        offsets stay on the device, and `DroplessExperts` moves tokens to and from expert
        order by gathers, in the compute dtype. With a capacity the kept slots have a
        data-dependent count: under torch.compile every slot runs instead and the dropped
        ones get gate 0 (the same result, one graph).
        """
        N, K, E = xf.shape[0], self.top_k, self.num_experts
        counts, gates = route.counts, route.gates
        routed = counts if route.routed is None else route.routed  # slots of real tokens
        flat, order = route.expert.reshape(-1), route.order  # (N·K,) token-major, choice-minor
        dtype = self._compute_dtype(xf)  # rows move in it (bf16 under autocast)
        if self.capacity_factor is None or not self.training:  # evaluation never drops
            return self._dropless(xf, route, dtype), None
        # C = ceil(cf · K · N / E) over the real tokens' K·N slots (padding is no token), E the
        # experts they may reach: under an expert mask, the allowed ones
        reach = E if route.reach is None else route.reach
        capacity = torch.ceil(self.capacity_factor * routed.sum() / reach).long()
        start = counts.cumsum(0) - counts  # (E,) first sorted slot of each expert
        rank = torch.arange(N * K, device=xf.device) - start[flat[order]]  # (N·K,)
        kept = routed.clamp(max=capacity)
        dropped = (routed.sum() - kept.sum()) / routed.sum().clamp(min=1)  # (0 of no slot)
        fits = rank < routed[flat[order]].clamp(max=capacity)  # real slots within capacity
        if torch.compiler.is_compiling():  # static shapes: every slot runs, dropped ones gated 0
            keep = torch.zeros_like(rank, dtype=torch.bool).scatter_(0, order, fits)
            return self._dropless(xf, route._replace(gates=gates * keep.view(N, K)), dtype), dropped
        order = order[fits]  # (S,) earliest real tokens first within each expert
        token = order // K  # (S,) source token of each kept slot
        xs = xf.to(dtype).index_select(0, token)  # (S, D)
        grouped = self._grouped(dtype, xf.device.type)
        out = expert_mlp(xs, self.w_in, self.w_out, kept, grouped, self.activation)
        weighted = out * gates.reshape(-1)[order, None]  # (S, D), float32 gates
        y = weighted.new_zeros(N, xf.shape[1]).index_add_(0, token, weighted)  # (N, D)
        return y.to(out.dtype), dropped

    def _dropless(self, xf: torch.Tensor, route: Routing, dtype: torch.dtype) -> torch.Tensor:
        """Every token-slot through its expert, mixed by the gates: (N, D) in `dtype`.

        Grouped matmul: `DroplessExperts`, one autograd node. Loop (CPU): the same steps
        recorded by autograd (its plain reference); tokens move by `index_select`, whose
        backward adds rows back (`index_add`), fine on CPU.
        """
        K, order, inverse = self.top_k, route.order, route.inverse
        if self._grouped(dtype, xf.device.type):
            keep = torch.is_grad_enabled()
            return DroplessExperts.apply(xf, route.gates, self.w_in, self.w_out, order, inverse,
                                         route.offsets, self.activation, dtype,
                                         self._triton(xf), keep)  # fmt: skip
        xs = gather_rows(xf, order, K, dtype)  # (N·K, D) in expert order
        out = expert_mlp(xs, self.w_in, self.w_out, route.counts, False, self.activation)
        return combine(out, inverse, route.gates, K, dtype)

    def _triton(self, x: torch.Tensor) -> bool:
        """Whether routing and token moves of x's rows run as Triton kernels: on CUDA unless
        `use_triton` says otherwise, eager (under torch.compile Inductor fuses the torch ops),
        Triton installed, at least one row."""
        wanted = x.is_cuda if self.use_triton is None else self.use_triton
        if not wanted or torch.compiler.is_compiling() or x.shape[0] == 0:
            return False
        return triton_module("moe_routing_triton") is not None

    def _grouped(self, dtype: torch.dtype, device: str) -> bool:
        """Grouped matmul (accelerators, or when forced) if it can run here, else the loop.

        On CPU the loop of E dense matmuls is the default: torch's grouped kernel measured no
        faster (1 thread) or 1.3× slower (2 threads) there (`scripts/bench.py`).
        """
        if not (device != "cpu" if self.use_grouped_mm is None else self.use_grouped_mm):
            return False
        widths = (self.dim, self.hidden)
        return grouped_mm_runs(dtype, device, widths, (self.w_in, self.w_out))

    def _soft_mixture(self, xf: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Dense mixture Σ_e p_e · E_e(x): every expert on every token. (N, D) → (N, D)."""
        xs = xf.to(self._compute_dtype(xf))
        h = activate(torch.einsum("nd,edh->enh", xs, self.w_in.to(xs.dtype)), self.activation)
        out = torch.bmm(h, self.w_out.to(xs.dtype))  # (E, N, D)
        return torch.einsum("ne,end->nd", probs, out.to(probs.dtype)).to(xs.dtype)

    @staticmethod
    def _compute_dtype(x: torch.Tensor) -> torch.dtype:
        """The autocast dtype when autocast is on (grouped_mm is not autocast-aware)."""
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors with one row per expert, by attribute name: expert i is `t[i]`.

        Router rows, stacked expert weights and, with `aux_free_bias`, the selection bias and
        load counts. Merging, freezing and continual-learning code address experts through
        this instead of guessing from tensor shapes.
        """
        tensors = {
            "router": self.router,
            "w_in": self.w_in,
            "w_out": self.w_out,
            "routing_bias": self.routing_bias,
            "load_counts": self.load_counts,
            "fair_counts": self.fair_counts,
        }
        return {name: t for name, t in tensors.items() if t is not None}

    @torch.no_grad()
    def update_routing_bias(self) -> None:
        """DeepSeek-V3 step: bias += rate · sign(fair_load − load); reset the counts.

        Call once per optimizer step (counts are summed over micro-batches and, under DDP,
        across ranks). A no-op when `aux_free_bias` is off.
        """
        if self.routing_bias is None:
            return
        counts = torch.stack([self.load_counts, self.fair_counts])  # (2, E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        load, fair = counts
        self.routing_bias += self.bias_update_rate * torch.sign(fair - load)
        self.load_counts.zero_()
        self.fair_counts.zero_()

    @torch.no_grad()
    def add_experts(self, n: int) -> None:
        """Append n freshly initialised experts and router rows; old ones stay unchanged.

        Replaces the stacked parameters, so build the optimizer after calling this.
        """
        if n < 1:
            raise ValueError(f"add_experts(n={n}) needs n >= 1")
        for name in ("router", "w_in", "w_out"):
            old = getattr(self, name)
            new = _init_stacked_(old.new_empty(n, *old.shape[1:]))
            grown = nn.Parameter(torch.cat([old, new]), requires_grad=old.requires_grad)
            setattr(self, name, grown)
        if self.routing_bias is not None:
            self.routing_bias = torch.cat([self.routing_bias, self.routing_bias.new_zeros(n)])
            self.load_counts = torch.cat([self.load_counts, self.load_counts.new_zeros(n)])
            self.fair_counts = torch.cat([self.fair_counts, self.fair_counts.new_zeros(n)])
        if self.open_experts is not None:  # (new experts are open)
            self.open_experts = torch.cat([self.open_experts, self.open_experts.new_ones(n)])
        self.num_experts += n

    def extra_repr(self) -> str:
        mode = "soft" if self.soft else f"top_k={self.top_k}"
        return f"dim={self.dim}, hidden={self.hidden}, experts={self.num_experts}, {mode}, " + (
            f"activation={self.activation}, capacity_factor={self.capacity_factor}"
        )


def _bincount(index: torch.Tensor, weight: torch.Tensor | None, size: int) -> torch.Tensor:
    """(size,) int64 count of each value of `index`, or of those where `weight` is True, by a
    scatter-add (`torch.bincount` reads its maximum back to the host)."""
    ones = torch.ones_like(index) if weight is None else weight.long()
    return torch.zeros(size, dtype=torch.long, device=index.device).scatter_add_(0, index, ones)


def _reach(allowed: torch.Tensor | None, real: torch.Tensor | None) -> torch.Tensor | None:
    """() the experts that at least one real token may be routed to under the (N, E) mask
    `allowed`: where the token-slots spread, for GShard's capacity and Switch's balance loss
    (None without a mask: all of them); at least 1, as a micro-batch of padding alone reaches
    none. On the device: no host read."""
    if allowed is None:
        return None
    return (allowed if real is None else allowed & real[:, None]).any(0).sum().clamp(min=1)


def _token_mean(values: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-token `values` (N, …) over dim 0, over the `real` tokens only if given."""
    if real is None:
        return values.mean(0)
    weight = real.to(values.dtype).reshape(-1, *[1] * (values.dim() - 1))
    return (values * weight).sum(0) / weight.sum().clamp(min=1)


def _init_stacked_(p: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default init per expert: U(±1/√fan_in), fan_in = dim 1 (router: dim 1)."""
    bound = p.shape[1] ** -0.5 if p.dim() == 3 else p.shape[-1] ** -0.5
    with torch.no_grad():
        return p.uniform_(-bound, bound)


@dataclass(frozen=True)
class MoEConfig(BlockConfig):
    """`model.moe`: the MoE options a user sets (see `MoE` for each one's meaning)."""

    name: ClassVar[str] = "moe"

    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 0
    shared_hidden: int | None = None
    capacity_factor: float | None = None
    soft: bool = False
    router_jitter: float = 0.0
    balance_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3

    def checks(self, shape: ModelShape) -> Checks:
        k = self.key
        yield self.num_experts >= 1, f"{k('num_experts')}={self.num_experts} must be >= 1"
        yield self.top_k >= 1, f"{k('top_k')}={self.top_k} must be >= 1"
        yield (
            self.top_k <= self.num_experts,
            f"{k('top_k')}={self.top_k} exceeds {k('num_experts')}={self.num_experts}",
        )
        yield (
            self.num_shared_experts >= 0,
            f"{k('num_shared_experts')}={self.num_shared_experts} must be >= 0",
        )
        yield (
            self.shared_hidden is None or self.shared_hidden >= 1,
            f"{k('shared_hidden')}={self.shared_hidden} must be >= 1",
        )
        cf = self.capacity_factor
        yield cf is None or cf > 0, f"{k('capacity_factor')}={cf} must be > 0"
        yield (
            not (self.soft and cf is not None),
            f"{k('capacity_factor')}={cf} must be null with {k('soft')}=true "
            "(soft routing never drops)",
        )
        yield (
            not (self.soft and self.aux_free_bias),
            f"{k('aux_free_bias')}=True needs top-k routing ({k('soft')}=false): the bias "
            "only affects selection",
        )
        yield (
            0.0 <= self.router_jitter < 1.0,
            f"{k('router_jitter')}={self.router_jitter} must be in [0, 1)",
        )
        yield (
            self.balance_loss_weight >= 0,
            f"{k('balance_loss_weight')}={self.balance_loss_weight} must be >= 0",
        )
        yield self.z_loss_weight >= 0, f"{k('z_loss_weight')}={self.z_loss_weight} must be >= 0"
        yield (
            self.bias_update_rate > 0,
            f"{k('bias_update_rate')}={self.bias_update_rate} must be > 0",
        )

    def build(self, shape: ModelShape, causal: bool = True) -> MoE:
        """The MoE FFN of a layer of `shape` (routing is the same in causal stacks)."""
        return MoE(
            shape.dim, shape.hidden, activation=shape.activation, dropout=shape.dropout,
            **self.options(),
        )  # fmt: skip
