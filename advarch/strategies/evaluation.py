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


def score_sums(
    batches: Iterable[Batch], score: Callable[[Batch], torch.Tensor], width: int = 1
) -> torch.Tensor:
    """(width + 1,) float64, on the CPU: over every example of `batches`, the sum of
    `score(batch)`'s one value per example (N,), or of each of its `width` columns (N, K)
    (bits per byte: nats, bytes), then the count of examples. Sums add up across DDP
    processes; means would not (a process without batches adds zeros of the same width)."""
    sums = torch.zeros(width + 1, dtype=torch.float64)
    for batch in batches:
        scores = score(batch).cpu().double()  # (float64 on the CPU: not every device has it)
        sums += torch.cat([scores.sum(0).reshape(-1), torch.tensor([float(len(scores))])])
    return sums


def mean_of(sums: torch.Tensor) -> torch.Tensor:
    """The means of `score_sums`: () for one value per example, (K,) for K columns."""
    mean = sums[:-1] / sums[-1].clamp_min(1)
    return mean[0] if mean.numel() == 1 else mean


def sharded(loader: Iterable[Batch]) -> bool:
    """Whether `loader` holds one DDP process's share of its examples (its sampler deals them
    out to `num_replicas` processes, as `DistributedSampler` does), not all of them."""
    return getattr(getattr(loader, "sampler", None), "num_replicas", 1) > 1


def mean_per_example(batches: Iterable[Batch], score: Callable[[Batch], torch.Tensor]) -> float:
    """Mean of `score(batch)` (one value per example) over every example of `batches`."""
    return float(mean_of(score_sums(batches, score)))


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
