"""One evaluation loop: the sum and mean of a per-example score over batches, in eval mode by
the caller.

`ContinualStrategy.evaluate_tasks` (each task's accuracy or bits/byte after every task, its
sums added across DDP processes) and `accuracy` (a plain model on classification batches: the
finetune and merging demos) share it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


def score_sums(batches: Iterable[Batch], score: Callable[[Batch], torch.Tensor]) -> torch.Tensor:
    """(2,) float64: the sum of `score(batch)` (one value per example) over every example of
    `batches`, and their count: sums add up across DDP processes, means would not."""
    sums = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        scores = score(batch)
        sums += torch.stack([scores.double().sum().cpu(), torch.tensor(scores.numel())])
    return sums


def sharded(loader: Iterable[Batch]) -> bool:
    """Whether `loader` holds one DDP process's share of its examples (its sampler deals them
    out to `num_replicas` processes, as `DistributedSampler` does), not all of them."""
    return getattr(getattr(loader, "sampler", None), "num_replicas", 1) > 1


def mean_per_example(batches: Iterable[Batch], score: Callable[[Batch], torch.Tensor]) -> float:
    """Mean of `score(batch)` (one value per example) over every example of `batches`."""
    total, count = score_sums(batches, score).tolist()
    return total / max(count, 1)


@torch.no_grad()
def accuracy(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    expert_mask: torch.Tensor | None = None,
    classes: Sequence[int] | None = None,
) -> float:
    """Accuracy of a classification model over `batches` (dicts with `inputs`, `labels`).

    `classes` restricts the prediction to those classes' logits (task-aware evaluation);
    `expert_mask` (E,) is passed to the model (e.g. `FinetuneStrategy.base_expert_mask()`).
    """

    def correct(batch: Batch) -> torch.Tensor:
        logits = model(batch["inputs"], expert_mask=expert_mask).logits  # (B, C)
        if classes is not None:
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            allowed[list(classes)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits.argmax(-1) == batch["labels"]

    return mean_per_example(batches, correct)
