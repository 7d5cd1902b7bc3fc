"""Joint multi-task training with task-balanced loss weighting and gate statistics.

Every batch trains every task present in it (Caruana 1997; Ma et al., KDD 2018 for the
Multi-gate MoE whose gates this strategy inspects). The training loss is the task-balanced mean

    L = sum_{k in batch} w_k L_k / sum_{k in batch} w_k,   L_k = mean loss of task k's examples

so each task counts by its weight `w_k` (`strategy.task_weights`) whatever its share of the batch
(the expectation of task-balanced sampling, without owning the sampler). Regression batches
carry targets for all K tasks in every example (`targets` (B, K)); classification batches carry
`task` (B,) and the model has one head per task (logits (B, K, C)).

Gate statistics: models with per-task gates (`advarch.models.mmoe.MultiGateMoE`) report the
batch-mean gate of task k as `stats["gate/task_{k}"]` (E,). Over each validation and test epoch
the strategy averages them and logs the mean pairwise cosine similarity of the tasks' gate
distributions (`<split>/gate_cosine`) and per-task expert usage (`<split>/<task>/expert{e}`),
for validation and test apart. Related tasks share experts (cosine near 1); unrelated tasks
split them (lower cosine).

Shapes: B batch, K tasks, C classes, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from advarch.models.output import ModelOutput, TaskHeads
from advarch.spec import DataSpec
from advarch.strategies.base import BaseStrategy
from advarch.strategies.objectives import WeightedMean, select_task_logits

SPLITS = ("train", "val", "test")


def gate_cosine(gates: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of K gate distributions (K, E) → scalar (1 for K = 1)."""
    unit = F.normalize(gates.float(), dim=-1)  # (float32: MPS has no float64)
    sim = unit @ unit.T  # (K, K)
    k = gates.shape[0]
    if k == 1:
        return sim.new_ones(()).to(gates.dtype)
    off_diagonal = sim.sum() - sim.diagonal().sum()
    return (off_diagonal / (k * (k - 1))).to(gates.dtype)


def balanced_task_loss(
    example_loss: torch.Tensor, task: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task-balanced weighted loss from per-example losses.

    Args:
        example_loss: (N,) loss of each example-task pair.
        task: (N,) long task id of each pair.
        weights: (K,) per-task weights.

    Returns:
        `(loss scalar, per-task mean losses (K,), present (K,) bool)`; tasks absent from the
        batch have mean 0 and do not count. A batch of zero-weight tasks only has loss 0.
    """
    k = weights.shape[0]
    counts = torch.bincount(task, minlength=k)  # (K,)
    sums = example_loss.new_zeros(k).index_add(0, task, example_loss)  # (K,)
    per_task = sums / counts.clamp_min(1)
    present = counts > 0
    w = weights.to(example_loss.dtype) * present
    total = w.sum()
    return (w * per_task).sum() / torch.where(total > 0, total, 1.0), per_task, present


class MultiTaskStrategy(BaseStrategy):
    """Trains K tasks jointly (module docstring).

    Args:
        base: `BaseStrategy`'s options (optimizer, scheduler, aux_loss_weight).
        task_weights: one loss weight per task (in `spec.task_names` order); null = all 1.

    Raises:
        ValueError: for single-task or continual (one-task-at-a-time) data, a model without
            one head per task, or task weights that do not match the tasks.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        *,
        task_weights: Sequence[float] | None = None,
        **base: Any,
    ) -> None:
        _check_data(spec)
        heads = model.num_heads_out if isinstance(model, TaskHeads) else spec.num_tasks
        if heads != spec.num_tasks:
            raise ValueError(
                f"strategy=multitask needs one head per task ({spec.num_tasks}); the model has "
                f"{heads}: set model.heads=per_task"
            )
        weights = [1.0] * spec.num_tasks if task_weights is None else list(task_weights)
        if len(weights) != spec.num_tasks or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"strategy.task_weights={weights} must give {spec.num_tasks} non-negative weights "
                f"(tasks {', '.join(spec.task_names)}) with a positive sum"
            )
        super().__init__(model, spec, **base)
        self.register_buffer("task_weights", torch.tensor(weights), persistent=False)
        self.task_metrics = nn.ModuleDict(
            {f"{s}_{t}": self._task_metric_set() for s in SPLITS for t in spec.task_names}
        )
        # per split: (K·E + 1,) the tasks' gates summed over examples, then the example count
        self.gate_sums: dict[str, torch.Tensor] = {}

    def _task_metric_set(self) -> nn.ModuleDict:
        if self.spec.kind == "regression":
            score = torchmetrics.MeanSquaredError()
        else:
            score = torchmetrics.Accuracy(task="multiclass", num_classes=self.spec.num_classes)
        return nn.ModuleDict({"loss": WeightedMean(), "score": score})

    # -- steps --------------------------------------------------------------------------------
    def shared_step(
        self, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, ModelOutput]:
        """Task-balanced loss; updates overall, per-task and gate stats."""
        out = self(batch)
        example_loss, task, preds, target = self._example_losses(out, batch)
        task_loss, per_task, present = balanced_task_loss(example_loss, task, self.task_weights)
        overall_preds = preds if self.spec.kind == "regression" else select_task_logits(preds, task)
        self.objective.update(split, task_loss, overall_preds, target, target.shape[0])
        self._update_task_metrics(split, per_task, present, preds, target, task)
        self._accumulate_gates(split, out.stats, preds.shape[0])
        return task_loss, out

    def _example_losses(
        self, out: ModelOutput, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per example-task loss (N,), task ids (N,), predictions, targets)."""
        if self.spec.kind == "regression":
            pred, target = out.logits.float(), batch["targets"].float()  # (B, K)
            k = pred.shape[1]
            task = torch.arange(k, device=pred.device).repeat(pred.shape[0])  # (B·K,) task-minor
            return (pred - target).pow(2).flatten(), task, pred, target
        if "task" not in batch:
            raise ValueError("strategy=multitask on classification data needs a `task` key")
        logits = out.logits.float()  # (B, K, C)
        task = batch["task"]
        own = select_task_logits(logits, task)  # (B, C)
        return (
            F.cross_entropy(own, batch["labels"], reduction="none"),
            task,
            logits,
            batch["labels"],
        )

    def _update_task_metrics(
        self,
        split: str,
        per_task: torch.Tensor,
        present: torch.Tensor,
        preds: torch.Tensor,
        target: torch.Tensor,
        task: torch.Tensor,
    ) -> None:
        for k, name in enumerate(self.spec.task_names):
            if not present[k]:
                continue
            m = self.task_metrics[f"{split}_{name}"]
            if self.spec.kind == "regression":
                m["loss"].update(per_task[k].detach(), weight=preds.shape[0])
                m["score"].update(preds[:, k].detach(), target[:, k])
            else:
                rows = task == k
                m["loss"].update(per_task[k].detach(), weight=int(rows.sum()))
                m["score"].update(preds[rows, k].detach(), target[rows])

    def _accumulate_gates(self, split: str, stats: dict[str, torch.Tensor], examples: int) -> None:
        """Add a batch's mean gates (`gate/task_k`, (E,) each) weighted by its examples."""
        keys = [f"gate/task_{k}" for k in range(self.spec.num_tasks)]
        if split == "train" or keys[0] not in stats:
            return
        gates = torch.stack([stats[k] for k in keys]).float().flatten() * examples  # (K·E,)
        sums = torch.cat([gates, gates.new_tensor([examples])])
        self.gate_sums[split] = self.gate_sums.get(split, 0) + sums

    def _epoch_gates(self, split: str) -> torch.Tensor:
        """The split's gates (K, E) averaged over its examples, across DDP processes."""
        sums = self.gate_sums.pop(split)
        if self._trainer is not None:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        return (sums[:-1] / sums[-1]).float().view(self.spec.num_tasks, -1)

    # -- epoch logging ------------------------------------------------------------------------
    def metric_names(self) -> list[str]:
        score = "mse" if self.spec.kind == "regression" else "acc"
        per_task = [
            f"{s}/{name}/{k}"
            for s in ("val", "test")
            for name in self.spec.task_names
            for k in ("loss", score)
        ]
        gates = [f"{s}/gate_cosine" for s in ("val", "test")]
        gates += [f"{s}/{name}/expert*" for s in ("val", "test") for name in self.spec.task_names]
        return [*super().metric_names(), *per_task, *gates]

    def training_metrics(self) -> Mapping[str, torchmetrics.Metric]:
        tasks = {
            f"{name}/{k}": metric
            for name in self.spec.task_names
            for k, metric in self.task_metrics[f"train_{name}"].items()
        }
        return {**super().training_metrics(), **tasks}

    def _log_epoch(self, split: str) -> None:
        super()._log_epoch(split)
        score = "mse" if self.spec.kind == "regression" else "acc"
        values = {}
        for name in self.spec.task_names:
            m = self.task_metrics[f"{split}_{name}"]
            if m["loss"].update_count:
                values[f"{split}/{name}/loss"] = m["loss"].compute()
                values[f"{split}/{name}/{score}"] = m["score"].compute()
            for metric in m.values():
                metric.reset()
        if split in self.gate_sums:
            gates = self._epoch_gates(split)  # (K, E)
            values[f"{split}/gate_cosine"] = gate_cosine(gates)  # (split: no mixed series)
            for name, usage in zip(self.spec.task_names, gates, strict=True):
                values.update({f"{split}/{name}/expert{e}": u for e, u in enumerate(usage)})
        if values:
            self.log_dict(values)


def _check_data(spec: DataSpec) -> None:
    """Multi-task training needs ≥ 2 tasks served together (not a continual stream)."""
    if spec.num_tasks < 2:
        raise ValueError(
            f"strategy=multitask needs data with >= 2 tasks; this data has one task "
            f"({spec.task_names[0]!r}): choose e.g. data=mmoe_synthetic or strategy=plain"
        )
    if "epochs_per_task" in spec.extras:
        raise ValueError(
            "strategy=multitask trains all tasks jointly, but this data is a continual stream "
            "that serves one task at a time: use strategy=plain or strategy=ewc with it"
        )
    if spec.kind not in ("regression", "classification"):
        raise ValueError(
            f"strategy=multitask needs regression or classification data, got "
            f"data kind {spec.kind!r}"
        )
