"""Optimizer and learning-rate schedule as two factories a strategy calls, never configures.

`optimizer(param_groups)` builds any torch optimizer (configs/optimizer/: `_partial_` torch.optim
classes holding lr, weight decay …); `scheduler(optimizer, total_steps)` builds its per-step
schedule (configs/scheduler/: `cosine`, `linear`, `constant` below, each a linear warm-up capped
at a tenth of training). Strategies only supply the parameter groups and the step count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
SchedulerFactory = Callable[[Optimizer, int], LRScheduler]
NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm)


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices take the optimizer's weight decay; norms,
    biases (also stacked ones, `expert_bias`), token embeddings, 1-d tensors and parameters
    marked `_no_weight_decay` (Mamba's convention: the SSM's A_log) none (`weight_decay: 0`);
    learned feature positions decay, as GPT-2's. Frozen ones are left out."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES) or "norm" in type(module).__name__.lower():
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        keep = p.ndim < 2 or id(p) in no_decay or name.endswith("bias")
        (rest if keep or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def _warmup(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> int:
    """The warm-up length actually used (at most a tenth of training), after checking inputs."""
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps={warmup_steps!r} must be an integer >= 0")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"scheduler.min_lr_ratio={min_lr_ratio!r} must be in [0, 1]")
    return min(warmup_steps, total_steps // 10)


def _after_warmup(
    optimizer: Optimizer, total_steps: int, warmup: int, decay: Callable[[float], float]
) -> LambdaLR:
    """Multiplier (step + 1) / warmup during warm-up, then `decay(progress)`, progress 0 → 1."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(min(1.0, (step - warmup) / max(1, total_steps - warmup)))

    return LambdaLR(optimizer, multiplier)


def cosine(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 50, min_lr_ratio: float = 0.1
) -> LambdaLR:
    """Linear warm-up to the optimizer's lr, then cosine decay to `min_lr_ratio`·lr at the end."""
    warmup = _warmup(warmup_steps, total_steps, min_lr_ratio)
    return _after_warmup(
        optimizer,
        total_steps,
        warmup,
        lambda p: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)),
    )


def linear(
    optimizer: Optimizer, total_steps: int, warmup_steps: int = 50, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up to the optimizer's lr, then linear decay to `min_lr_ratio`·lr at the end."""
    warmup = _warmup(warmup_steps, total_steps, min_lr_ratio)
    return _after_warmup(optimizer, total_steps, warmup, lambda p: 1 - (1 - min_lr_ratio) * p)


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 50) -> LambdaLR:
    """Linear warm-up to the optimizer's lr, then that lr to the end."""
    return _after_warmup(optimizer, total_steps, _warmup(warmup_steps, total_steps), lambda p: 1.0)


# The library defaults of a strategy built in Python (configs/ pick their own: adamw, cosine).
DEFAULT_OPTIMIZER: OptimizerFactory = partial(
    torch.optim.AdamW, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95)
)
DEFAULT_SCHEDULER: SchedulerFactory = partial(cosine, warmup_steps=100, min_lr_ratio=0.1)
