"""The model contracts strategies rely on: the output every backbone returns, and the
optional interfaces (`ExpertModel`, `TaskHeads`, `OutputLayers`) they call instead of probing
attributes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from advarch.models.layers import RoutedFFN


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


@runtime_checkable
class ExpertModel(Protocol):
    """A model whose MoE layers strategies mask, freeze, grow, merge and rebalance
    (`Model`, and `MultiGateMoE` with none); a model without it has no experts."""

    def moe_layers(self) -> list[RoutedFFN]: ...


@runtime_checkable
class TaskHeads(Protocol):
    """A model with `num_heads_out` outputs per example: one per task or one shared by all
    (`Model` keeps the per-task heads as equal, task-major row blocks of `head`)."""

    num_heads_out: int


@runtime_checkable
class OutputLayers(Protocol):
    """A model whose layers after its pooled `features` are the parameters its
    `OUTPUT_LAYERS` globs name (`Model`: its head; `MultiGateMoE`: its towers): what reads the
    features alone (few-shot episodes) trains them not, a fine-tune trains them by default."""

    OUTPUT_LAYERS: tuple[str, ...]


def output_layer_globs(model: object) -> tuple[str, ...]:
    """The model's `OUTPUT_LAYERS`; `head.*` for one that names none (advarch's convention)."""
    return model.OUTPUT_LAYERS if isinstance(model, OutputLayers) else ("head.*",)
