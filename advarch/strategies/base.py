"""The LightningModule every strategy extends: optimisation, task loss, metrics, logging.

Subclasses add only what makes them different (a penalty, a task boundary, episodes …) by
overriding `extra_loss`, `shared_step` or Lightning hooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torchmetrics
from torch import nn

from advarch.checkpoint import non_finite_parameter
from advarch.data.sampling import resume_train_epoch
from advarch.errors import ConfigError
from advarch.models.output import ExpertModel, ModelOutput
from advarch.spec import DataSpec
from advarch.strategies.freezing import FrozenSlice
from advarch.strategies.objectives import (
    Objective,
    load_metrics_state,
    metrics_state,
    model_inputs,
    own_metric_states,
)
from advarch.strategies.optimization import (
    DEFAULT_OPTIMIZER,
    DEFAULT_SCHEDULER,
    OptimizerFactory,
    SchedulerFactory,
    parameter_groups,
)


def count_parameters(model: nn.Module) -> dict[str, int]:
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {
        "params/total": total,
        "params/trainable": trainable,
        "params/frozen": total - trainable,
    }


TRAIN_METRICS = "train_epoch_metrics"  # checkpoint entry: the running training epoch's metrics
WORLD_SIZE = "world_size"  # checkpoint entry: how many processes trained (DDP)
OPEN_EXPERTS = "open_experts"  # checkpoint entry: (E,) the experts routing may use, or None


def saved_open_experts(checkpoint: dict[str, Any]) -> list[bool] | None:
    """The experts a checkpoint's model left open to routing (`MoE.open_experts`: a continual
    run's experts no task owns are closed); None where every expert is open."""
    return checkpoint.get(OPEN_EXPERTS)


def open_experts(model: nn.Module) -> list[bool] | None:
    """The experts `model`'s MoE layers leave open to routing (the same in every layer), or
    None where they are all open."""
    layers = model.moe_layers() if isinstance(model, ExpertModel) else []
    closing = [m.open_experts for m in layers if getattr(m, "open_experts", None) is not None]
    return closing[0].tolist() if closing else None


def close_experts(model: nn.Module, open_ones: Sequence[bool]) -> None:
    """Close `model`'s MoE layers to the experts `open_ones` marks False (on each layer's
    device: a resumed run restores its checkpoint where the model already trains)."""
    for layer in model.moe_layers() if isinstance(model, ExpertModel) else []:
        device = next(layer.parameters(), torch.empty(0)).device
        layer.open_experts = torch.tensor(list(open_ones), dtype=torch.bool, device=device)


class BaseStrategy(L.LightningModule):
    """Trains `model` on the task its DataSpec describes.

    Args:
        model: the plain nn.Module (an advarch Model) to train.
        spec: the datamodule's DataSpec.
        optimizer: builds the optimizer from parameter groups (`optimization.parameter_groups`:
            no weight decay on norms, biases, embeddings); configs/optimizer/ in a run.
        scheduler: builds the per-step LR schedule from the optimizer and the total number of
            optimizer steps; configs/scheduler/ in a run.
        aux_loss_weight: multiplier on the model's auxiliary (MoE) loss.
    """

    validated_at_step: int | None = None  # step of the last validation (train.py reads it)

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        optimizer: OptimizerFactory = DEFAULT_OPTIMIZER,
        scheduler: SchedulerFactory = DEFAULT_SCHEDULER,
        aux_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if not aux_loss_weight >= 0:
            raise ValueError(f"strategy.aux_loss_weight={aux_loss_weight} must be >= 0")
        # (not logged: the loggers get the whole run config, `train.build_loggers`)
        self.save_hyperparameters(ignore=["model", "spec", "optimizer", "scheduler"], logger=False)
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        self.hparams["spec"] = asdict(spec)
        self.model = model
        self.spec = spec
        self.objective = Objective(spec)
        self.hparams.update(count_parameters(model))
        self._saved_train_metrics: dict[str, Any] | None = None  # a resume's, until train start
        self._saved_world_size: int | None = None
        self.frozen: list[FrozenSlice] = []  # kept bit-exact through every optimizer step

    def setup(self, stage: str) -> None:
        """This process's own metric states (`own_metric_states`: ddp_spawn shared them)."""
        own_metric_states(self)

    # -- steps --------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], **extra: Any) -> ModelOutput:
        inputs, kwargs = model_inputs(batch)
        return self.model(inputs, **kwargs, **extra)

    def shared_step(
        self, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, ModelOutput]:
        """The task loss of a batch and the model's output; updates the split's metrics."""
        out = self(batch)
        task_loss, preds, target, weight = self.objective.loss(out, batch)
        self.objective.update(split, task_loss, preds, target, weight)
        return task_loss, out

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the training loss (EWC's penalty); none by default."""
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        """Optimises task loss + weighted aux loss + `extra_loss`; logs each part on its own
        (`train/loss` is the task loss, like `train/loss_epoch` and `val/loss`: comparable
        across models and strategies whatever their regularisers)."""
        task_loss, out = self.shared_step(batch, "train")
        loss = task_loss + self.hparams.aux_loss_weight * out.aux_loss
        extra = self.extra_loss()
        if extra is not None:
            self.log("train/penalty", extra.detach(), on_step=True, on_epoch=False)
            loss = loss + extra
        finite = bool(torch.isfinite(loss))
        diverged = not finite
        if self.trainer.world_size > 1:  # every process stops, or none does: one whose batch
            # alone gave NaN raised while the others waited for its gradients (a hang)
            diverged = self.trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            value = loss.item() if not finite else "not finite on another process"
            raise FloatingPointError(
                f"training loss is {value} at step {self.global_step} "
                f"(epoch {self.current_epoch}); stopping — {self._checkpoint_note()}. "
                "Try a lower optimizer.lr or trainer.gradient_clip_val"
            )
        bs = out.logits.shape[0]
        self.log("train/loss", task_loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/aux_loss", out.aux_loss.detach(), batch_size=bs)
        self._log_router_stats(out.stats, bs)
        return {"loss": loss, "stats": out.stats}

    def _checkpoint_note(self) -> str:
        """Which good checkpoint exists to resume from (the truth, also when there is none)."""
        callback = self.trainer.checkpoint_callback
        path = "" if callback is None else callback.last_model_path or callback.best_model_path
        if path and Path(path).is_file():
            return f"the last good checkpoint is {path}"
        return "no checkpoint was written before it, so there is nothing to resume from"

    def _log_router_stats(self, stats: dict[str, torch.Tensor], batch_size: int) -> None:
        scalars = {k: v for k, v in stats.items() if v.dim() == 0}
        if scalars:
            self.log_dict(scalars, on_step=True, on_epoch=False, batch_size=batch_size)

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        _, out = self.shared_step(batch, "val")
        self._update_loader_metrics("val", dataloader_idx, batch, out)

    def test_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        _, out = self.shared_step(batch, "test")
        self._update_loader_metrics("test", dataloader_idx, batch, out)

    def _update_loader_metrics(
        self, split: str, loader: int, batch: dict[str, torch.Tensor], out: ModelOutput
    ) -> None:
        """A task stream evaluates task j on loader j: score it apart as well, so a run shows
        each task's values (`<split>/task_<j>/<metric>`), not only their mix."""
        loaders = self.trainer.num_val_batches if split == "val" else self.trainer.num_test_batches
        if len(loaders) > 1 and self.spec.num_tasks == len(loaders):
            self.objective.update(split, *self.objective.loss(out, batch), task=loader)

    def _log_epoch(self, split: str) -> dict[int, dict[str, torch.Tensor]]:
        """Epoch aggregates; training's are `train/<name>_epoch`, apart from the per-step curve;
        each task's, where a task stream evaluated them apart (returned by task). Nothing for
        an epoch without batches (a run resumed at the end of its epoch)."""
        if not self.objective.updated(split):
            return {}
        values = self.objective.compute(
            split, text_of=self.trained_task if split == "train" else None
        )
        suffix = "_epoch" if split == "train" else ""
        self.log_dict(
            {f"{split}/{k}{suffix}": v for k, v in values.items()}, prog_bar=split == "val"
        )
        tasks = self.objective.tasks_updated(split)
        per_task = {task: self.objective.compute(split, task) for task in tasks}
        for task, values in per_task.items():
            self.log_dict({f"{split}/task_{task}/{k}": v for k, v in values.items()})
        return per_task

    @property
    def trained_task(self) -> int | None:
        """The one task this epoch's training batches come from (a continual stream), or None
        where they mix tasks."""
        return None

    def metric_names(self) -> list[str]:
        """What this strategy logs (fnmatch patterns): `optimized_metric` and checkpoint or
        early-stopping monitors are checked against it before training starts."""
        values = self.objective.metric_names()
        names = ["train/loss", "train/aux_loss", "train/penalty", "moe/*", "lr-*", "params/*"]
        names += [f"train/{v}_epoch" for v in values if v != "unigram_bpb"]  # (evaluated only)
        evaluated = [f"{split}/{v}" for split in ("val", "test") for v in values]
        return names + evaluated + [name.replace("/", "/task_*/") for name in evaluated]

    def parameter_counts(self) -> dict[str, int]:
        """Total, trainable and frozen parameters of the model (the run's model summary)."""
        return count_parameters(self.model)

    def training_metrics(self) -> Mapping[str, torchmetrics.Metric]:
        """The metrics of the running training epoch, which checkpoints keep."""
        return self.objective.training_metrics()

    def on_train_start(self) -> None:
        resume_train_epoch(self.trainer)  # exact batches and epoch hooks after a resume
        if not self.trainer.fit_loop.restarted_mid_epoch:
            return  # (a new epoch starts)
        self._check_world_size()
        saved, self._saved_train_metrics = self._saved_train_metrics, None
        if saved and self.trainer.global_rank == 0:  # (it holds every process's batches)
            load_metrics_state(self.training_metrics(), saved)

    def _check_world_size(self) -> None:
        """An epoch resumed in the middle skips what the saved run's processes trained and ends
        at the batch count of its own: on another number of processes it would silently train
        other batches than the uninterrupted run."""
        saved, world = self._saved_world_size, self.trainer.world_size
        if saved is not None and saved != world:
            raise ConfigError(
                f"ckpt_path={self.trainer.ckpt_path} stopped in the middle of an epoch, trained "
                f"by {saved} process(es); this run has {world}: resume it with as many "
                "(trainer.devices × trainer.num_nodes), or from a checkpoint of an epoch's end"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Diverged weights are not saved (over the last good checkpoint, or as the best): the
        run stops where they are found, as at a non-finite loss (the next step's check)."""
        name = non_finite_parameter(self.model)
        diverged = name is not None
        if self.trainer.world_size > 1:  # every process stops, or none does: sharded weights
            # (FSDP) put a NaN in one process's shard only, and the others would wait for it
            diverged = self.trainer.strategy.reduce_boolean_decision(diverged, all=False)
        if diverged:
            which = f"parameter {name!r}" if name else "a parameter of another process's shard"
            raise FloatingPointError(
                f"{which} is NaN or inf at step {self.global_step} (epoch "
                f"{self.current_epoch}); stopping without saving it — {self._checkpoint_note()}"
                ". Try a lower optimizer.lr or trainer.gradient_clip_val"
            )
        checkpoint[TRAIN_METRICS] = metrics_state(self.training_metrics())
        checkpoint[WORLD_SIZE] = self.trainer.world_size
        checkpoint[OPEN_EXPERTS] = open_experts(self.model)  # (eval.py, a fine-tune of it)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._saved_train_metrics = checkpoint.get(TRAIN_METRICS)  # restored in on_train_start
        self._saved_world_size = checkpoint.get(WORLD_SIZE)
        if saved_open_experts(checkpoint) is not None:  # (a model rebuilt without its base)
            close_experts(self.model, saved_open_experts(checkpoint))

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step  # train.py re-validates a stale final model

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Aux-loss-free MoE balancing: nudge routing biases once per optimizer step; then
        zero the frozen slices' gradients (before clipping: they take no share of its norm)."""
        if isinstance(self.model, ExpertModel):
            for moe in self.model.moe_layers():
                moe.update_routing_bias()
        for frozen in self.frozen:
            frozen.zero_grad()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the frozen slices restored bit-exactly (`freezing`)."""
        super().optimizer_step(*args, **kwargs)
        for frozen in self.frozen:
            frozen.restore()

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.make_optimizer(parameter_groups(self.model))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.make_scheduler(optimizer, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
