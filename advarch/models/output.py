"""The model-output contract every backbone returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    """What a model forward returns.

    Attributes:
        logits: predictions: `(B, T, V)` for LMs and seq2seq, `(B, C)` for classifiers
            (`(B, num_tasks, C)` for multi-head models), or features for metric heads.
        aux_loss: weighted sum of auxiliary losses (MoE balance and z-losses); a zero
            scalar for dense models. Strategies add it to the task loss.
        stats: detached per-layer statistics for logging, keyed `moe/layer{i}/<name>`:
            `load` (E,) fraction of routed tokens per expert, `dropped`, `entropy`,
            `balance_loss`, `z_loss` (scalars).
        features: pooled features before the head, when the model has them.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
