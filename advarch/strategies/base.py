"""The LightningModule every strategy extends: optimisation, task loss, metrics, logging.

Subclasses add only what makes them different (a penalty, a task boundary, episodes …) by
overriding `extra_loss`, `shared_step` or Lightning hooks.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from advarch.data.sampling import reload_train_loader_on_resume
from advarch.models.output import ExpertModel, ModelOutput
from advarch.spec import DataSpec
from advarch.strategies.objectives import Objective, model_inputs

NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms, biases, embeddings and 1-d tensors.

    Only trainable parameters are included, so frozen ones never reach the optimizer.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, NO_DECAY_MODULES) or "norm" in type(module).__name__.lower():
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (rest if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine decay to `min_lr_ratio` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def count_parameters(model: nn.Module) -> dict[str, int]:
    unique = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    return {
        "params/total": total,
        "params/trainable": trainable,
        "params/frozen": total - trainable,
    }


class BaseStrategy(L.LightningModule):
    """Trains `model` on the task its DataSpec describes.

    Args:
        model: the plain nn.Module (an advarch Model) to train.
        spec: the datamodule's DataSpec.
        lr: peak learning rate of AdamW.
        weight_decay: decoupled weight decay on matrices.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps (capped at a tenth of training).
        min_lr_ratio: final learning rate as a fraction of `lr` after cosine decay.
        aux_loss_weight: multiplier on the model's auxiliary (MoE) loss.
    """

    validated_at_step: int | None = None  # step of the last validation (train.py reads it)

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        aux_loss_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"strategy.lr={lr} must be positive")
        if warmup_steps < 0:
            raise ValueError(f"strategy.warmup_steps={warmup_steps} must be ≥ 0")
        self.save_hyperparameters(ignore=["model", "spec"])
        self.hparams["spec"] = asdict(spec)
        self.model = model
        self.spec = spec
        self.objective = Objective(spec)
        self.hparams.update(count_parameters(model))

    # -- steps --------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor], **extra: Any) -> ModelOutput:
        inputs, kwargs = model_inputs(batch)
        return self.model(inputs, **kwargs, **extra)

    def shared_step(
        self, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, ModelOutput]:
        """Task loss + weighted aux loss (+ `extra_loss` in training); updates metrics."""
        out = self(batch)
        task_loss, preds, target, weight = self.objective.loss(out, batch)
        self.objective.update(split, task_loss, preds, target, weight)
        loss = task_loss + self.hparams.aux_loss_weight * out.aux_loss
        return loss, out

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser added to the training loss (EWC's penalty); none by default."""
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        loss, out = self.shared_step(batch, "train")
        extra = self.extra_loss()
        if extra is not None:
            self.log("train/penalty", extra.detach(), on_step=True, on_epoch=False)
            loss = loss + extra
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss.item()} at step {self.global_step} "
                f"(epoch {self.current_epoch}); stopping — {self._checkpoint_note()}. "
                "Try a lower strategy.lr or trainer.gradient_clip_val"
            )
        bs = out.logits.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
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
        self.shared_step(batch, "val")

    def test_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.shared_step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        """Epoch aggregates; training's are `train/<name>_epoch`, apart from the per-step curve."""
        values = self.objective.compute(split)
        suffix = "_epoch" if split == "train" else ""
        self.log_dict(
            {f"{split}/{k}{suffix}": v for k, v in values.items()}, prog_bar=split == "val"
        )

    def metric_names(self) -> list[str]:
        """What this strategy logs (fnmatch patterns): `optimized_metric` and checkpoint or
        early-stopping monitors are checked against it before training starts."""
        values = self.objective.metric_names()
        names = ["train/loss", "train/aux_loss", "train/penalty", "moe/*", "lr-*", "params/*"]
        names += [f"train/{v}_epoch" for v in values]
        return names + [f"{split}/{v}" for split in ("val", "test") for v in values]

    def on_train_start(self) -> None:
        reload_train_loader_on_resume(self.trainer)  # exact batches after a mid-epoch resume

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step  # train.py re-validates a stale final model

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Aux-loss-free MoE balancing: nudge routing biases once per optimizer step."""
        if isinstance(self.model, ExpertModel):
            for moe in self.model.moe_layers():
                moe.update_routing_bias()

    # -- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            parameter_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas)
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, total // 10)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
