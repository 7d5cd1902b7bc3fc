"""Continual learning inside one `trainer.fit`: task boundaries, metric matrix, expert masks.

Used directly (`strategy=naive`) this is plain sequential fine-tuning on the stream; EWC
(`strategies/ewc.py`) adds a penalty through `extra_loss` and a `consolidate` hook.

The stream (`advarch/data/stream.py`: permuted/split/rotated digits, text domains) switches
the training task at epoch boundaries and validates on one loader per task. The per-task
metric is accuracy for classification streams (higher is better) and bits per byte for
language-model streams (lower is better; over the UTF-8 bytes of the tokens scored). At the end of
each task this module evaluates every task (seen and unseen) on the validation split to fill
the matrix R[i, j] = metric on task j after training task i (the untrained model's values
b_j are measured once at fit start), logs `cl/avg_acc` or `cl/avg_bpb`, `cl/bwt`, `cl/fwt`,
`cl/forgetting` (definitions and sign conventions in `advarch/continual_metrics.py`), writes
`<run>/continual/<metric>_matrix.csv` and `<run>/plots/<metric>_matrix.png`, then calls
`consolidate(task)`. The matrix, b and the number of finished tasks live in the checkpoint
(keys `accuracy_matrix`, `initial_accuracy` whatever the metric), and a resumed run catches
up on any task boundary the checkpoint was saved before.

Expert masks (MoE models, `expert_masks=true`): task t owns experts [t·E/T, (t+1)·E/T) of every
MoE layer (the remainder of E/T experts is never used: closed to routing, `MoE.open_experts`,
so evaluation without a task id never meets an untrained expert). Training on task t masks the
router to task t's experts; task-incremental evaluation (`scenario: task`) masks by each
example's task id. Experts owned by other tasks are frozen by restoring their slices (router
rows, w_in, w_out, routing bias — every tensor an MoE layer holds with leading dim E) from a
snapshot after every optimizer step: earlier tasks' keep what they learned, later tasks' their
initialisation. Zeroing their gradients would not do: AdamW's momentum and weight decay move a
parameter with zero gradient. With `freeze_shared_after_first_task=true`
everything except the current task's experts and head rows (its head, or its classes' rows of
the class scenario's one head) is restored the same way after task 0, so old tasks' outputs in
task-incremental evaluation are bit-identical. Frozen tensors stay in the optimizer, so the
optimizer state of a resumed run matches.

`joint=true` is the multi-task upper bound on the same stream: each epoch draws from ALL
tasks' training sets as many examples as one task's epoch (`joint_train_loader` of the
stream, so the number of optimizer steps equals the sequential runs'): `setup("fit")` asks the
stream for it with `train_jointly(True)`.

Shapes: B batch, E experts per MoE layer, T tasks, C classes per head.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from advarch.checkpoint import CheckpointError
from advarch.continual_metrics import (
    continual_summary,
    plot_accuracy_matrix,
    save_accuracy_matrix_csv,
)
from advarch.models.output import ExpertModel, ModelOutput, TaskHeads
from advarch.spec import DataSpec, TaskSchedule, TaskStream
from advarch.strategies.base import OPEN_EXPERTS, BaseStrategy, close_experts
from advarch.strategies.evaluation import mean_of, score_sums, sharded
from advarch.strategies.freezing import FrozenSlice, freeze
from advarch.strategies.objectives import IGNORE, model_inputs, select_task_logits

Batch = dict[str, torch.Tensor]
NEEDS_MOE = "strategy.expert_masks=true needs a model with MoE layers (model.ffn contains moe)"
log = logging.getLogger("advarch")
TASK_METRIC = {"classification": "acc", "lm": "bpb"}  # per-task metric of each data kind


class ContinualStrategy(BaseStrategy):
    """Sequential training on a task stream with continual metrics (`strategy=naive`).

    Args:
        base: `BaseStrategy`'s options (optimizer, scheduler, aux_loss_weight).
        expert_masks: give each task its own block of MoE experts (module docstring).
        freeze_shared_after_first_task: after task 0 train only the current task's experts
            and head rows; everything else is kept bit-identical.
        joint: the upper bound: train on all tasks' data at once (module docstring).

    Raises:
        ValueError: for data that is neither classification nor language modelling, expert
            masks on a model without MoE layers or with fewer experts per task than
            `model.moe.top_k`, joint with freezing, and freezing that leaves nothing to train.
    """

    strategy_name = "naive"

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        *,
        expert_masks: bool = False,
        freeze_shared_after_first_task: bool = False,
        joint: bool = False,
        **base: Any,
    ) -> None:
        super().__init__(model, spec, **base)
        if spec.kind not in TASK_METRIC:
            raise ValueError(
                f"strategy={self.strategy_name} needs a classification or language-model task "
                f"stream (e.g. data=text_domains or data=permuted_digits), got data kind "
                f"{spec.kind!r}"
            )
        if joint and freeze_shared_after_first_task:
            raise ValueError(
                "strategy.joint=true trains all tasks at once; it cannot be combined "
                "with strategy.freeze_shared_after_first_task=true"
            )
        self.num_tasks = spec.num_tasks
        self.scenario = spec.extras.get("scenario", "task")
        if freeze_shared_after_first_task and not expert_masks:
            self._check_something_trains(model, self.scenario, self.num_tasks)
        self.task_metric = TASK_METRIC[spec.kind]  # acc (higher is better) or bpb (lower)
        owner = self._expert_owner(model, spec.num_tasks) if expert_masks else None
        self.register_buffer("expert_owner", owner, persistent=False)  # (E,) task id, -1 = unused
        if owner is not None and bool((owner < 0).any()):  # never trained: never routed to
            close_experts(model, (owner >= 0).tolist())  # (nor in evaluation, by any program)
        self.accuracy_matrix = torch.full((self.num_tasks, self.num_tasks), math.nan)  # R (acc/bpb)
        self.initial_accuracy = torch.full((self.num_tasks,), math.nan)  # b
        self.finished_tasks = 0
        # bits per byte of R over the scored tokens' own bytes; a stream resumed from a
        # checkpoint measured before them goes on over the split's ratio (`on_load_checkpoint`)
        self.scored_bytes = self.task_metric == "bpb" and self.objective.token_bytes is not None
        self._stream_was_finished = False  # resumed from a finished stream (`on_fit_start`)
        self._frozen_task: int | None = None

    @staticmethod
    def head_blocks(model: nn.Module, scenario: str, num_tasks: int) -> int:
        """In how many blocks of rows, one per task in task order, the output head's rows
        fall: a head per task, or the class scenario's one head of every task's classes
        (task t's are classes t·c … (t+1)·c − 1); 1 where the tasks share the head's rows."""
        if isinstance(model, TaskHeads) and model.num_heads_out > 1:
            return model.num_heads_out
        return num_tasks if scenario == "class" else 1

    @classmethod
    def _check_something_trains(cls, model: nn.Module, scenario: str, num_tasks: int) -> None:
        """Freezing the shared body without expert masks leaves only the task's head rows to
        train: refuse a model without head rows per task (a language model), whose later tasks
        would train nothing and read as zero forgetting."""
        if cls.head_blocks(model, scenario, num_tasks) > 1:
            return
        has_moe = isinstance(model, ExpertModel) and bool(model.moe_layers())
        fix = (
            "add strategy.expert_masks=true"
            if has_moe
            else "use an MoE model with "
            "strategy.expert_masks=true (e.g. model=moe) or a classifier with a head per task"
        )
        raise ValueError(
            "strategy.freeze_shared_after_first_task=true trains only the current task's experts "
            "(strategy.expert_masks=true) and its head rows after task 0; this model has neither "
            f"a head per task nor expert masks, so later tasks would train nothing: {fix}"
        )

    @staticmethod
    def _expert_owner(model: nn.Module, num_tasks: int) -> torch.Tensor:
        layers = model.moe_layers() if isinstance(model, ExpertModel) else []
        if not layers:
            raise ValueError(NEEDS_MOE)
        sizes = {m.num_experts for m in layers}
        if len(sizes) > 1:
            raise ValueError(
                f"strategy.expert_masks=true needs the same number of experts in every "
                f"MoE layer, got {sorted(sizes)}"
            )
        E = sizes.pop()
        need = max(1 if m.soft else m.top_k for m in layers)
        if num_tasks > E or E // num_tasks < need:
            raise ValueError(
                f"strategy.expert_masks=true splits model.moe.num_experts={E} among {num_tasks} "
                f"tasks ({E // num_tasks} each), fewer than the {need} experts a token is "
                "routed to (model.moe.top_k)"
            )
        block = E // num_tasks
        owner = torch.arange(E) // block
        return owner.masked_fill(owner >= num_tasks, -1)

    def metric_names(self) -> list[str]:
        average = f"avg_{self.task_metric}"
        return [
            *super().metric_names(),
            f"test/{average}",
            *(f"cl/{k}" for k in (average, "bwt", "fwt", "forgetting")),
        ]

    # -- the stream -----------------------------------------------------------------------------
    @property
    def schedule(self) -> TaskSchedule:
        """The stream's task schedule (one task forever for a datamodule that is not a stream)."""
        dm = self.trainer.datamodule
        return dm.schedule if isinstance(dm, TaskStream) else TaskSchedule(1, 1 << 30)

    def task_of_epoch(self, epoch: int) -> int:
        """The task trained in `epoch`: a pure function of the (checkpointed) epoch."""
        return self.schedule.task_of_epoch(epoch)

    @property
    def current_task(self) -> int:
        return self.task_of_epoch(self.current_epoch)

    @property
    def trained_task(self) -> int | None:
        return None if self.hparams.joint else self.current_task

    def task_train_loader(self, task: int, batch_size: int, seed: int) -> DataLoader:
        """A shuffled loader over task `task`'s training set, batched as the stream does."""
        return self._stream().task_loader("train", task, batch_size, True, seed)

    def _stream(self) -> TaskStream:
        dm = self.trainer.datamodule
        if not isinstance(dm, TaskStream):
            raise ValueError(
                f"strategy={self.strategy_name} needs a task stream (advarch.spec.TaskStream, "
                f"e.g. data=text_domains), got {type(dm).__name__}"
            )
        return dm

    def _batches(self, loader: DataLoader) -> Any:
        return ({k: v.to(self.device) for k, v in batch.items()} for batch in loader)

    def _val_batch_count(self, loader: DataLoader) -> int | None:
        """The batches of `loader` Lightning's validation runs (None: all):
        `trainer.limit_val_batches`, a count or a fraction of the loader, rounded down as
        Lightning does. A count is each process's under DDP: of a loader holding this
        process's share (`sharded`) as many; of one holding every example, as many as all
        processes read together (a share takes every W-th example). Where validation is off
        (a limit of 0) the matrix still reads every batch."""
        limit = getattr(self.trainer, "limit_val_batches", 1.0)
        if limit == 0 or (isinstance(limit, float) and limit == 1.0):
            return None
        if isinstance(limit, int):
            return limit if sharded(loader) else limit * getattr(self.trainer, "world_size", 1)
        return max(int(len(loader) * limit), 1)

    # -- forward with expert masks --------------------------------------------------------------
    def expert_mask(self, batch: Batch, routing_for_training: bool) -> torch.Tensor | None:
        """(B, E) experts allowed per example: its task's block, in training and in
        task-incremental evaluation; None (all experts) otherwise or without expert masks."""
        if self.expert_owner is None or "task" not in batch:
            return None
        if not routing_for_training and self.scenario != "task":
            return None
        return self.expert_owner[None, :] == batch["task"][:, None]  # (B, E)

    def forward(self, batch: Batch, **extra: Any) -> ModelOutput:
        mask = self.expert_mask(batch, self.training)
        if mask is not None:
            extra.setdefault("expert_mask", mask)
        return super().forward(batch, **extra)

    def log_probs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Log-probabilities for the Fisher, routed as in training: (B, C) log p(y|x) of each
        example's own head, or for language models (B, T, V) per position."""
        inputs, kwargs = model_inputs(batch)
        mask = self.expert_mask(batch, routing_for_training=True)
        if mask is not None:
            kwargs["expert_mask"] = mask
        logits = model(inputs, **kwargs).logits
        if self.task_metric == "acc":
            logits = select_task_logits(logits, batch.get("task"))
        return logits.float().log_softmax(-1)

    # -- evaluation of every task ---------------------------------------------------------------
    def task_scores(self, batch: Batch, out: ModelOutput) -> torch.Tensor:
        """Per-item scores whose mean is the task metric's raw value: correctness (B,) for
        classification; for language models, of every target token (padding dropped), the
        negative log-likelihood in nats and its UTF-8 bytes (N, 2), or the nats alone (N,)
        without a byte table or resumed from a stream measured without one (`scored_bytes`)."""
        if self.task_metric == "acc":
            logits = select_task_logits(out.logits, batch.get("task"))
            return (logits.argmax(-1) == batch["labels"]).float()
        labels = self.scored_labels(batch["labels"]).flatten()
        nll = F.cross_entropy(
            out.logits.flatten(0, 1).float(), labels, ignore_index=IGNORE, reduction="none"
        )
        scored = labels != IGNORE
        if not self.scored_bytes:
            return nll[scored]
        return torch.stack([nll[scored], self.objective.token_bytes[labels[scored]]], -1)

    def scored_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """A language model's target tokens with padding set to IGNORE (not scored)."""
        if self.task_metric == "acc" or self.spec.pad_id < 0:
            return labels
        return labels.masked_fill(labels == self.spec.pad_id, IGNORE)

    def score_width(self) -> int:
        """Values per item of `task_scores`: 2 for bits per byte over the scored bytes."""
        return 2 if self.scored_bytes else 1

    def task_value(self, task: int, mean_score: torch.Tensor | float) -> torch.Tensor:
        """The task metric from the mean of `task_scores`: accuracy as is; bits per byte, the
        mean nats / ln 2 / the mean bytes of the tokens scored, or without their bytes / task
        `task`'s whole validation split's bytes per token."""
        mean = torch.as_tensor(mean_score, dtype=torch.float32)
        if self.task_metric == "acc":
            return mean
        if mean.dim() == 0:
            return mean / math.log(2) / self.spec.bytes_per_token("val", task)
        return mean[0] / math.log(2) / mean[1]

    @torch.no_grad()
    def evaluate_tasks(self) -> torch.Tensor:
        """(T,) validation metric (acc or bpb) on every task with the current weights, in eval
        mode and the trainer's precision (autocast under `*-mixed`, as validation), on the
        batches validation uses (`trainer.limit_val_batches`): the matrix row of a boundary
        equals the `val/task_<j>/*` values logged with the same weights."""
        loaders = self.trainer.datamodule.val_dataloader()
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        if len(loaders) != self.num_tasks:
            raise ValueError(
                f"the datamodule returned {len(loaders)} validation loaders for "
                f"{self.num_tasks} tasks"
            )
        was_training = self.training
        self.eval()
        values = torch.zeros(self.num_tasks)
        precision = self.trainer.precision_plugin.val_step_context
        for task, loader in enumerate(loaders):
            batches = itertools.islice(self._batches(loader), self._val_batch_count(loader))
            with precision():
                sums = score_sums(batches, lambda b: self.task_scores(b, self(b)),
                                  self.score_width())  # fmt: skip
            if sharded(loader):  # this process's share: add the others' (every process's R)
                sums = self.trainer.strategy.reduce(sums.to(self.device), reduce_op="sum").cpu()
            values[task] = self.task_value(task, mean_of(sums))
        self.train(was_training)
        return values

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()  # each task's values too: `val/task_<j>/<metric>`
        if self._stream_was_finished and not self.trainer.sanity_checking:
            self._log_continual_summary()

    def on_test_epoch_end(self) -> None:
        """Per-task test metrics (the final row of R on the test split) and their mean."""
        per_task = self._log_epoch("test")
        if per_task:
            values = [v[self.task_metric] for v in per_task.values()]
            self.log(f"test/avg_{self.task_metric}", torch.stack(values).mean())

    # -- task boundaries ------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.joint and stage == "fit":
            self._stream().train_jointly(True)

    def on_train_start(self) -> None:
        super().on_train_start()
        if torch.isnan(self.initial_accuracy).all():
            self.initial_accuracy = self.evaluate_tasks()

    def on_train_epoch_start(self) -> None:
        task = self.current_task
        for earlier in range(self.finished_tasks, task):  # boundaries a resumed run missed
            self.finish_task(earlier)
        self._freeze_for(task)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        if self._task_ends_now():
            self.finish_task(self.current_task)
            self._save_boundary_checkpoint()

    def _save_boundary_checkpoint(self) -> None:
        """last.ckpt right after a task's boundary work (R row, consolidation), whatever the
        checkpoint cadence, so no finished task is ever lost (needs a ModelCheckpoint)."""
        callback = self.trainer.checkpoint_callback
        if callback is None or not callback.dirpath:
            return
        path = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        self.trainer.save_checkpoint(path)
        callback.last_model_path = str(path)  # its own last.ckpt (else it writes last-v1.ckpt)

    def _task_ends_now(self) -> bool:
        trainer, epoch = self.trainer, self.current_epoch
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= epoch + 1
        out_of_steps = 0 < trainer.max_steps <= trainer.global_step
        return last_epoch or out_of_steps or trainer.should_stop or self.schedule.ends_task(epoch)

    def finish_task(self, task: int) -> None:
        """Fill row `task` of R, log the continual metrics, write the CSV, then consolidate."""
        if task < self.finished_tasks:
            return
        self.accuracy_matrix[task] = self.evaluate_tasks()
        self.finished_tasks = task + 1
        self._log_continual_summary()
        self._save_matrix_csv()
        if task + 1 < self.num_tasks:
            self.consolidate(task)

    def _log_continual_summary(self) -> None:
        """`cl/*` of the finished tasks' rows of R."""
        seen = self.finished_tasks
        summary = continual_summary(
            self.accuracy_matrix[:seen, :seen].numpy(),
            self.initial_accuracy[:seen].numpy(),
            self.task_metric,
        )
        self.log_dict({f"cl/{k}": v for k, v in summary.items() if math.isfinite(v)})

    def _save_matrix_csv(self) -> None:
        if self.trainer.is_global_zero:
            save_accuracy_matrix_csv(
                self.accuracy_matrix.numpy(),
                self._run_dir / "continual" / f"{self._matrix_name}.csv",
                self.spec.task_names,
            )

    def consolidate(self, task: int) -> None:
        """Called once at the end of each task but the last; naive fine-tuning keeps nothing."""

    def on_fit_start(self) -> None:
        """A run resumed from a checkpoint of a finished stream trains nothing (Lightning skips
        the fit loop and its hooks): say so, and report the stream's results in this run
        (matrix CSV and heatmap now, `cl/*` at the validation that follows)."""
        super().on_fit_start()
        self._stream_was_finished = self.finished_tasks == self.num_tasks
        if self._stream_was_finished:
            log.info(
                "the checkpoint's stream finished all %d tasks: nothing left to train; "
                "reporting its continual results",
                self.num_tasks,
            )
            self._save_matrix_csv()
            self._plot_matrix()

    def on_train_end(self) -> None:
        self._plot_matrix()

    def _plot_matrix(self) -> None:
        """Heatmap of R, and a W&B image when a WandbLogger is attached."""
        if not self.trainer.is_global_zero:
            return
        png = plot_accuracy_matrix(
            self.accuracy_matrix.numpy(),
            self._run_dir / "plots" / f"{self._matrix_name}.png",
            self.spec.task_names,
            self.task_metric,
        )
        for logger in self.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.log_image(key=f"cl/{self._matrix_name}", images=[str(png)])

    @property
    def _run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    @property
    def _matrix_name(self) -> str:
        return "accuracy_matrix" if self.task_metric == "acc" else f"{self.task_metric}_matrix"

    # -- freezing owned experts and the shared body ---------------------------------------------
    def _freeze_for(self, task: int) -> None:
        """Snapshot what training task `task` must not change (from the current weights);
        nothing under `joint`, whose every epoch trains every task's experts."""
        if self._frozen_task == task:
            return
        self._frozen_task = task
        self.frozen = [] if self.hparams.joint else self.frozen_slices(task)

    def frozen_slices(self, task: int) -> list[FrozenSlice]:
        """Every expert but task `task`'s: earlier tasks' keep what they learned, later tasks'
        their initialisation (AdamW's weight decay shrank them before their task: 4% by the
        4th domain of text_domains); after task 0 with freeze_shared, all but task `task`'s
        experts and head."""
        shared = self.hparams.freeze_shared_after_first_task and task > 0
        out, handled = [], set()
        if self.expert_owner is not None:
            rows = (self.expert_owner != task).nonzero()[:, 0].to(self.device)
            for moe in self.model.moe_layers():
                for tensor in moe.expert_tensors().values():
                    out.append(freeze(tensor, rows))
                    handled.add(id(tensor))
        if not shared:
            return out
        head = self.model.head
        heads = self.head_blocks(self.model, self.scenario, self.num_tasks)
        if heads > 1:  # task t's C rows (its head, or its classes' rows of the one head)
            C = head.weight.shape[0] // heads
            rows = torch.arange(head.weight.shape[0], device=self.device)
            rows = rows[(rows < task * C) | (rows >= (task + 1) * C)]
            for p in head.parameters():
                out.append(freeze(p, rows))
                handled.add(id(p))
        out += [freeze(p) for p in self.model.parameters() if id(p) not in handled]
        return out

    # -- checkpoint -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["continual"] = {
            "accuracy_matrix": self.accuracy_matrix.clone(),
            "initial_accuracy": self.initial_accuracy.clone(),
            "finished_tasks": self.finished_tasks,
            "schedule": asdict(self.schedule),
            "task": self.current_task,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("continual")
        if state is None:
            return
        saved = state.get("schedule")
        if (
            saved is not None
            and self._trainer is not None
            and TaskSchedule(**saved) != self.schedule
        ):
            raise CheckpointError(
                f"the checkpoint was written by a stream of {saved['num_tasks']} tasks x "
                f"{saved['epochs_per_task']} epochs; this run has {self.schedule.num_tasks} x "
                f"{self.schedule.epochs_per_task} (data.num_tasks, data.epochs_per_task): resume "
                "with the same stream"
            )
        self.accuracy_matrix = state["accuracy_matrix"].clone().cpu()
        self.initial_accuracy = state["initial_accuracy"].clone().cpu()
        self.finished_tasks = int(state["finished_tasks"])
        owner = self.expert_owner
        if OPEN_EXPERTS not in checkpoint and owner is not None and bool((owner < 0).any()):
            resumed = self._trainer is not None  # (else eval.py, generation: nothing goes on)
            measured = ("its accuracy matrix so far was measured with them open (from here on "
                        "they are closed)" if resumed else "its run measured them open; this "
                        "model routes with them closed")  # fmt: skip
            log.warning("this checkpoint was written before experts no task owns were closed "
                        "to routing: %s", measured)  # fmt: skip
        saved_spec = checkpoint.get("hyper_parameters", {}).get("spec") or {}
        if self.scored_bytes and "token_bytes" not in (saved_spec.get("extras") or {}):
            self.scored_bytes = False  # one definition in one matrix
            log.info(
                "resumed a stream whose bits-per-byte matrix was measured over each "
                "split's bytes per token (before exact bits per byte): its rows go on so"
            )
