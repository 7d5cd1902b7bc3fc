"""Multi-gate Mixture-of-Experts, one-gate MoE and shared-bottom multi-task models.

Ma et al., KDD 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts":

    shared bottom (eq. 1):  y_k = h^k(f(x))
    one-gate MoE (eq. 5):   y_k = h^k(sum_i g(x)_i f_i(x)),     g(x) = softmax(W_g x)
    MMoE (eq. 6-8):         y_k = h^k(sum_i g^k(x)_i f_i(x)),   g^k(x) = softmax(W_gk x)

Experts f_i are one-hidden-layer ReLU networks over the raw input features, towers h^k are
one-hidden-layer ReLU networks per task, gates are bias-free linear maps followed by a softmax
(eq. 8). The shared bottom is the same module with a single expert and no gate, so the three
models differ only in `gating` and `num_experts`. Experts, gates and towers are stored stacked
(`(E, …)`, `(G, …)`, `(tasks, …)`) and run as batched einsums: no loop over experts or tasks.

Shapes: B batch, F input features, E experts, H expert hidden width, G gates (tasks, 1 or 0),
K tasks, U tower hidden width, O outputs per task (1 for regression, C classes).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from advarch.models.output import ModelOutput
from advarch.spec import DataSpec

Gating = Literal["per_task", "shared", "none"]
GATINGS = ("per_task", "shared", "none")


class MultiGateMoE(nn.Module):
    """MMoE (`gating=per_task`), one-gate MoE (`shared`) or shared bottom (`none`).

    Args:
        spec: the datamodule's DataSpec; needs feature inputs (`num_features`) and kind
            `regression` (one output per task) or `classification` (C logits per task).
        num_experts: experts E (must be 1 for the shared bottom).
        expert_hidden: hidden width H of each expert (the bottom width of the shared bottom).
        tower_hidden: hidden width U of each task's tower.
        gating: `per_task` (MMoE), `shared` (one gate for all tasks) or `none` (shared bottom).
        dropout: dropout on the expert outputs.

    Raises:
        ValueError: naming the `model.<key>` that is invalid.
    """

    OUTPUT_LAYERS = ("tower_*", "out_bias")  # after the pooled features (`OutputLayers`)

    def __init__(
        self,
        spec: DataSpec,
        num_experts: int = 8,
        expert_hidden: int = 16,
        tower_hidden: int = 8,
        gating: Gating = "per_task",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _validate(spec, num_experts, expert_hidden, tower_hidden, gating, dropout)
        self.spec, self.gating = spec, gating
        tasks, features = spec.num_tasks, spec.num_features
        outputs = 1 if spec.kind == "regression" else spec.num_classes
        self.num_heads_out = tasks  # one tower per task, as Model's per-task heads
        gates = {"per_task": tasks, "shared": 1, "none": 0}[gating]
        self.expert_in = nn.Parameter(_uniform(features, num_experts, features, expert_hidden))
        self.expert_bias = nn.Parameter(torch.zeros(num_experts, expert_hidden))
        self.gate = (
            nn.Parameter(_uniform(features, gates, features, num_experts)) if gates else None
        )
        self.tower_in = nn.Parameter(_uniform(expert_hidden, tasks, expert_hidden, tower_hidden))
        self.tower_bias = nn.Parameter(torch.zeros(tasks, tower_hidden))
        self.tower_out = nn.Parameter(_uniform(tower_hidden, tasks, tower_hidden, outputs))
        self.out_bias = nn.Parameter(torch.zeros(tasks, outputs))
        self.dropout = nn.Dropout(dropout)

    def gates(self, x: torch.Tensor) -> torch.Tensor | None:
        """Gate distributions (B, G, E) over the experts, or None for the shared bottom."""
        if self.gate is None:
            return None
        return torch.einsum("bf,gfe->bge", x, self.gate).softmax(-1)

    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        """inputs (B, F) features → logits (B, K) for regression, (B, K, C) or (B, C) for
        classification (K = 1); `features` (B, K·H) are the towers' inputs, concatenated;
        `stats["gate/task_{k}"]` (E,) the batch-mean gate of task k (absent without gates).

        1. every expert on every example; 2. mix per gate; 3. one tower per task."""
        x = inputs.to(self.expert_in.dtype)
        h = F.relu(torch.einsum("bf,efh->beh", x, self.expert_in) + self.expert_bias)  # (B, E, H)
        h = self.dropout(h)
        gates = self.gates(x)
        if gates is None:
            mixed = h.expand(-1, self.num_heads_out, -1)  # (B, K, H): one expert, no gate
        else:
            mixed = torch.einsum("bge,beh->bgh", gates, h)  # (B, G, H)
            mixed = mixed.expand(-1, self.num_heads_out, -1)  # (B, K, H); G = 1 or K
        u = F.relu(torch.einsum("bkh,khu->bku", mixed, self.tower_in) + self.tower_bias)
        logits = torch.einsum("bku,kuo->bko", u, self.tower_out) + self.out_bias  # (B, K, O)
        if self.spec.kind == "regression":
            logits = logits.squeeze(-1)  # (B, K)
        elif self.num_heads_out == 1:
            logits = logits.squeeze(1)  # (B, C)
        return ModelOutput(
            logits=logits.contiguous(),
            aux_loss=logits.new_zeros(()),
            stats=self._gate_stats(gates),
            features=mixed.flatten(1),
        )

    def _gate_stats(self, gates: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if gates is None:
            return {}
        mean = gates.detach().mean(0).expand(self.num_heads_out, -1)  # (K, E)
        return {f"gate/task_{k}": mean[k] for k in range(self.num_heads_out)}

    def moe_layers(self) -> list[nn.Module]:
        """No token-routed MoE FFN layers (the gates here route whole examples)."""
        return []


def _uniform(fan_in: int, *shape: int) -> torch.Tensor:
    """nn.Linear's default init U(±1/√fan_in) for a stacked weight of `shape`."""
    bound = fan_in**-0.5
    return torch.empty(*shape).uniform_(-bound, bound)


def _validate(
    spec: DataSpec,
    num_experts: int,
    expert_hidden: int,
    tower_hidden: int,
    gating: str,
    dropout: float,
) -> None:
    """Raise ValueError naming the first invalid `model.<key>` (or the data it cannot read)."""
    if spec.kind not in ("regression", "classification") or not spec.num_features:
        raise ValueError(
            f"model=mmoe needs feature-vector regression or classification data; got data kind "
            f"{spec.kind!r} with {spec.num_features} features"
        )
    if gating not in GATINGS:
        raise ValueError(f"model.gating={gating!r} is not one of: {', '.join(GATINGS)}")
    for key, value in (
        ("num_experts", num_experts),
        ("expert_hidden", expert_hidden),
        ("tower_hidden", tower_hidden),
    ):
        if value < 1:
            raise ValueError(f"model.{key}={value} must be >= 1")
    if gating == "none" and num_experts != 1:
        raise ValueError(
            f"model.gating=none (shared bottom) needs model.num_experts=1, got {num_experts}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model.dropout={dropout} must be in [0, 1)")
