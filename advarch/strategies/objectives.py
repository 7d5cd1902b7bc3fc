"""Task losses and metrics per data kind, so every strategy scores every kind the same way."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from advarch.models.output import ModelOutput
from advarch.spec import DataSpec

IGNORE = -100
BYTES = "bytes_per_token"  # the metric of UTF-8 bytes per scored target token (not logged)
UNIGRAM = "unigram_bits"  # the unigram model's bits per scored target token (logged per byte)
HIDDEN = (BYTES, UNIGRAM)  # states of the logged values, not values themselves


def model_inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Split a batch into the model's positional input and keyword inputs."""
    inputs = batch["input_ids"] if "input_ids" in batch else batch["inputs"]
    kwargs = {
        k: batch[k]
        for k in ("decoder_input_ids", "neighbours", "global_mask", "pad_mask")
        if k in batch
    }
    return inputs, kwargs


def select_task_logits(logits: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
    """(B, tasks, C) per-task-head logits → (B, C) of each example's own task; (B, C) unchanged."""
    if logits.dim() == 3 and task is not None:
        return logits[torch.arange(logits.shape[0], device=logits.device), task]
    return logits


class WeightedMean(torchmetrics.Metric):
    """The mean of values weighted by counts: an epoch's loss from its batches' mean losses,
    each weighted by the targets it counted, over every DDP process.

    torchmetrics' `MeanMetric` either checks every update for NaN (a host sync per step on an
    accelerator, and a diverged loss silently dropped from the mean), or, with
    `nan_strategy="disable"`, replaces the weights by ones (torchmetrics issue #3434): the
    loss became the plain mean of the batches' means, over-weighting a short last batch.
    Here a NaN stays NaN, a batch of weight 0 (no counted target: its mean loss is NaN) adds
    nothing, and nothing syncs. The states keep `MeanMetric`'s names, so checkpoints load; one
    written mid-epoch before this class holds a sum of batch means and their count, which the
    resumed epoch's training loss then weights by one target a batch.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("mean_value", torch.tensor(0.0), dist_reduce_fx="sum")  # Σ value·weight
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        value = torch.as_tensor(value, dtype=self.mean_value.dtype, device=self.device)
        weight = torch.as_tensor(weight, dtype=value.dtype, device=value.device)
        weight = torch.broadcast_to(weight, value.shape)
        self.mean_value += torch.where(weight > 0, value * weight, 0.0).sum()
        self.weight += weight.sum()

    def compute(self) -> torch.Tensor:
        return self.mean_value / self.weight


def own_metric_states(module: nn.Module) -> None:
    """Copy every torchmetrics state of `module` that lies in shared memory into this
    process's own. ddp_spawn hands its workers the launching process's modules with their
    tensors in shared memory: in-place metric updates then summed every process's batches into
    one tensor until a reset, and left the launcher's copy holding them (a validation it ran
    after `fit` started from the first validation's sums: val/loss 2.1720 for 2.0403)."""
    for metric in module.modules():
        if not isinstance(metric, torchmetrics.Metric):
            continue
        for name in metric._defaults:
            value = getattr(metric, name)
            if isinstance(value, torch.Tensor) and value.is_shared():
                setattr(metric, name, value.clone())
            elif isinstance(value, list) and any(v.is_shared() for v in value):
                setattr(metric, name, [v.clone() for v in value])


class Objective(nn.Module):
    """Loss and metrics for one data kind; torchmetrics, one set per split (keys `train_`, …:
    nn.Module already owns `.train`) and, for data of several tasks, one per task of the
    evaluation splits (`val_task1_`, …: a task stream evaluates each task on a loader of its
    own). Bits per byte divide the nats of the targets scored by those targets' UTF-8 bytes,
    counted with the data's `token_bytes` table beside the loss."""

    def __init__(self, spec: DataSpec) -> None:
        super().__init__()
        self.spec = spec
        table = spec.token_bytes if spec.kind in ("lm", "seq2seq") else None
        table = None if table is None else torch.tensor(table, dtype=torch.float32)
        self.register_buffer("token_bytes", table, persistent=False)  # (V,), from the data
        bits = spec.unigram_bits if table is not None else None
        bits = None if bits is None else torch.tensor(bits, dtype=torch.float32)
        self.register_buffer("unigram_bits", bits, persistent=False)  # (V,), the baseline
        per_task = range(spec.num_tasks) if spec.num_tasks > 1 else ()
        keys = ["train_", "val_", "test_"]
        keys += [f"{split}_task{t}_" for split in ("val", "test") for t in per_task]
        self.metrics = nn.ModuleDict({key: self._metrics(key != "train_") for key in keys})

    def _metrics(self, evaluated: bool) -> nn.ModuleDict:
        """A split's metrics; an `evaluated` one (val, test) scores the unigram baseline too."""
        m = nn.ModuleDict({"loss": WeightedMean()})
        if self.spec.kind == "regression":
            m["mse"] = torchmetrics.MeanSquaredError()
        else:
            classes = (
                self.spec.target_vocab_size or self.spec.vocab_size
                if self.spec.kind in ("lm", "seq2seq")
                else self.spec.num_classes
            )
            m["acc"] = torchmetrics.Accuracy(
                task="multiclass", num_classes=classes, ignore_index=IGNORE
            )
        if self.token_bytes is not None:
            m[BYTES] = WeightedMean()  # synced, reset and checkpointed as the loss is
        if evaluated and self.unigram_bits is not None:
            m[UNIGRAM] = WeightedMean()
        return m

    def metric_names(self) -> list[str]:
        """The names `compute` returns (loss, acc or mse, and ppl, bpb for language data, and
        where the data gives its unigram model, that baseline's bits per byte on the same
        tokens: `unigram_bpb`, evaluated splits only)."""
        names = ["loss", "mse" if self.spec.kind == "regression" else "acc"]
        names += ["ppl", "bpb"] if self.spec.kind in ("lm", "seq2seq") else []
        return names + (["unigram_bpb"] if self.unigram_bits is not None else [])

    def loss(
        self, out: ModelOutput, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(loss, predictions-or-logits, targets, weight) for the batch's task loss."""
        if self.spec.kind in ("lm", "seq2seq"):
            labels = batch["labels"]
            if self.spec.pad_id >= 0:
                labels = labels.masked_fill(labels == self.spec.pad_id, IGNORE)
            logits = out.logits.flatten(0, 1).float()
            loss = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE)
            return loss, logits, labels.flatten(), int((labels != IGNORE).sum())
        if self.spec.kind == "regression":
            pred = out.logits.float()
            loss = F.mse_loss(pred, batch["targets"].float())
            return loss, pred, batch["targets"].float(), pred.shape[0]
        logits = select_task_logits(out.logits, batch.get("task")).float()
        return F.cross_entropy(logits, batch["labels"]), logits, batch["labels"], logits.shape[0]

    def update(
        self,
        split: str,
        loss: torch.Tensor,
        preds: torch.Tensor,
        target: torch.Tensor,
        weight: int,
        task: int | None = None,
    ) -> None:
        """Add a batch's loss (averaged by `weight`, its counted targets) and predictions to
        `split`'s metrics, or to task `task`'s metrics of that split."""
        m = self.metrics[_key(split, task)]
        m["loss"].update(loss.detach(), weight=weight)
        key = "mse" if "mse" in m else "acc"
        m[key].update(preds.detach(), target)
        if BYTES in m:
            m[BYTES].update(*self.target_bytes(target))
        if UNIGRAM in m:
            scored = target != IGNORE
            m[UNIGRAM].update(self.unigram_bits[target.masked_fill(~scored, 0)], scored.float())

    def target_bytes(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(UTF-8 bytes of each target token, 1.0 where it is scored and 0.0 where ignored):
        a `WeightedMean` of them is the bytes per token of the text scored."""
        scored = target != IGNORE
        return self.token_bytes[target.masked_fill(~scored, 0)], scored.float()

    def updated(self, split: str, task: int | None = None) -> bool:
        """Whether `split` (or its task `task`) has values to compute since the last reset."""
        key = _key(split, task)
        return key in self.metrics and bool(self.metrics[key]["loss"].update_count)

    def tasks_updated(self, split: str) -> list[int]:
        """The tasks of `split` with per-task values to compute (none for one-task data)."""
        return [t for t in range(self.spec.num_tasks) if self.updated(split, t)]

    def training_metrics(self) -> Mapping[str, torchmetrics.Metric]:
        """The running training epoch's metrics (all tasks together)."""
        return self.metrics[_key("train", None)]

    def compute(self, split: str, task: int | None = None, text_of: int | None = None
                ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Epoch values of `split` (or of its task `task`), then reset: loss and acc/mse, plus
        ppl and bits per byte for language data (`_bytes_per_token`)."""
        m = self.metrics[_key(split, task)]
        values = {name: metric.compute() for name, metric in m.items() if name not in HIDDEN}
        if self.spec.kind in ("lm", "seq2seq"):
            values["ppl"] = torch.exp(values["loss"].clamp(max=50))
            bpt = self._bytes_per_token(m, split, text_of if task is None else task)
            if bpt is not None:
                values["bpb"] = values["loss"] / math.log(2) / bpt
            if UNIGRAM in m and m[UNIGRAM].update_count and bpt is not None:
                values["unigram_bpb"] = m[UNIGRAM].compute() / bpt
        for metric in m.values():
            metric.reset()
        return values

    def _bytes_per_token(
        self, m: nn.ModuleDict, split: str, task: int | None
    ) -> torch.Tensor | float | None:
        """UTF-8 bytes per token of the targets `m` scored (an epoch resumed from a state
        saved before the byte count: of the batches scored since). Without a byte table (a
        checkpoint written before it), the whole split's ratio, or its task's: `task`, or the
        `text_of` task all of a domain stream's training epoch came from; None for data that
        is not text."""
        if BYTES in m and m[BYTES].update_count:
            return m[BYTES].compute()
        return self.spec.bytes_per_token(split, task) or None


def metrics_state(metrics: Mapping[str, torchmetrics.Metric]) -> dict[str, dict[str, Any]]:
    """The running state of `metrics` (a checkpoint keeps training's, so an epoch resumed in
    the middle averages all of its batches, as the uninterrupted run does), over all of DDP's
    processes: a collective, as saving a checkpoint is (only rank 0's copy is written)."""
    state = {}
    for name, metric in metrics.items():
        with metric.sync_context():  # (no-op on one process)
            tensors = {k: _saved(metric, k, v) for k, v in metric.metric_state.items()}
        state[name] = {"tensors": tensors, "updates": metric.update_count}
    return state


def _saved(metric: torchmetrics.Metric, key: str, value: torch.Tensor | list[torch.Tensor]
           ) -> torch.Tensor | list[torch.Tensor]:  # fmt: skip
    """A copy of one state; a concatenating state stays a list (syncing concatenates it)."""
    if isinstance(metric._defaults[key], list) and isinstance(value, torch.Tensor):
        return [value.clone()]
    return _map(value, torch.Tensor.clone)


def load_metrics_state(metrics: Mapping[str, torchmetrics.Metric],
                       state: dict[str, dict[str, Any]]) -> None:  # fmt: skip
    """Put back a `metrics_state` of `metrics` (in one process of DDP's: it holds them all)."""
    for name, saved in state.items():
        metric = metrics[name]
        for key, value in saved["tensors"].items():
            setattr(metric, key, _map(value, lambda t, m=metric: t.to(m.device)))
        metric._update_count, metric._computed = saved["updates"], None


def _map(state: torch.Tensor | list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor]):
    """`fn` on a metric state: a tensor, or the list a concatenating metric keeps."""
    return [fn(t) for t in state] if isinstance(state, list) else fn(state)


def _key(split: str, task: int | None) -> str:
    """The metric set of a split, or of one task of it."""
    return f"{split}_" if task is None else f"{split}_task{task}_"
