"""The continual base (`strategy=naive`) as pure units: the task matrix, task boundaries, the
per-task metric, expert ownership and the resume state.

No Trainer runs: a stand-in holds what the strategy reads from one (the stream, the epoch,
the run folder), and the model is a lookup table whose accuracy on every task is set by hand,
so each expected matrix entry is known exactly. Every test takes milliseconds.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision
from torch import nn

from advarch.checkpoint import CheckpointError
from advarch.continual_metrics import continual_summary
from advarch.models.output import ModelOutput
from advarch.spec import DataSpec, TaskSchedule
from advarch.strategies.continual import ContinualStrategy

T, N = 3, 4  # tasks; validation examples per task (example i of task j has input id j·N + i)
SPEC = DataSpec(kind="classification", num_features=1, num_classes=2, task_names=("a", "b", "c"))


class LookupModel(nn.Module):
    """Predicts class 0 for the input ids in `right`, class 1 otherwise (every label is 0), so
    its accuracy on task j is the fraction of task j's ids in `right`."""

    def __init__(self) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(T * N, 2))
        self.modes: list[bool] = []  # `training` at every forward

    def set_right(self, per_task: list[int]) -> None:
        """The first per_task[j] examples of task j are answered right."""
        with torch.no_grad():
            self.logits.copy_(torch.tensor([0.0, 1.0]))
            for j, k in enumerate(per_task):
                self.logits[j * N : j * N + k] = torch.tensor([1.0, 0.0])

    def forward(self, inputs: torch.Tensor, **kwargs: Any) -> ModelOutput:
        self.modes.append(self.training)
        return ModelOutput(logits=self.logits[inputs[:, 0]], aux_loss=torch.zeros(()))


def val_loaders(batch_size: int = 3) -> list[list[dict[str, torch.Tensor]]]:
    """One loader (a list of batches) per task; the last batch of each is short."""
    loaders = []
    for j in range(T):
        ids = torch.arange(j * N, (j + 1) * N)[:, None]
        loaders.append(
            [
                {
                    "inputs": ids[i : i + batch_size],
                    "labels": torch.zeros(len(ids[i : i + batch_size]), dtype=torch.long),
                }
                for i in range(0, N, batch_size)
            ]
        )
    return loaders


class Stream:
    """A task stream (`advarch.spec.TaskStream`) of fixed per-task validation batches."""

    seed = 0
    joint = False

    def __init__(self, epochs_per_task: int = 2, num_tasks: int = T) -> None:
        self.schedule = TaskSchedule(num_tasks=num_tasks, epochs_per_task=epochs_per_task)
        self.loaders = val_loaders()

    @property
    def trainer_overrides(self) -> dict[str, int]:
        return self.schedule.trainer_overrides

    def task_loader(
        self, split: str, task: int, batch_size: int, shuffle: bool, seed: int
    ) -> list[dict[str, torch.Tensor]]:
        return self.loaders[task]

    def val_dataloader(self) -> list[list[dict[str, torch.Tensor]]]:
        return self.loaders

    def train_jointly(self, joint: bool) -> None:
        self.joint = joint


class Recording(ContinualStrategy):
    """The naive strategy, recording consolidations and logged values instead of a logger."""

    def __init__(self, model: nn.Module, spec: DataSpec = SPEC, **kwargs: Any) -> None:
        super().__init__(model, spec, **kwargs)
        self.consolidated: list[int] = []
        self.logged: list[dict[str, float]] = []

    def consolidate(self, task: int) -> None:
        self.consolidated.append(task)

    def log_dict(self, dictionary: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        self.logged.append({k: float(v) for k, v in dictionary.items()})


def attach(module: ContinualStrategy, root: Path, stream: Stream | None = None, **state: Any):
    """A stand-in Trainer holding the stream, the epoch and the run folder."""
    trainer = SimpleNamespace(
        datamodule=stream or Stream(),
        current_epoch=0,
        global_step=0,
        max_epochs=None,
        max_steps=-1,
        should_stop=False,
        is_global_zero=True,
        world_size=1,
        default_root_dir=str(root),
        loggers=[],
        checkpoint_callback=None,
        precision_plugin=Precision(),  # (32-true's: evaluation without autocast)
    )
    vars(trainer).update(state)
    module.trainer = trainer
    return trainer


def naive(tmp_path: Path, **state: Any) -> tuple[Recording, LookupModel]:
    model = LookupModel()
    module = Recording(model)
    attach(module, tmp_path, **state)
    return module, model


# -- evaluating every task ---------------------------------------------------------------------
def test_evaluate_tasks_gives_each_tasks_accuracy_in_eval_mode(tmp_path: Path) -> None:
    module, model = naive(tmp_path)
    model.set_right([4, 2, 1])
    module.train()
    values = module.evaluate_tasks()
    torch.testing.assert_close(values, torch.tensor([1.0, 0.5, 0.25]))
    assert model.modes and not any(model.modes)  # dropout off while measuring
    assert module.training  # and training mode restored afterwards


@pytest.mark.parametrize(("limit", "world", "want"), [
    (1, 1, [1.0, 2 / 3, 0.0]), (0.5, 1, [1.0, 2 / 3, 0.0]), (1.0, 1, [0.75, 0.5, 0.0]),
    (0, 1, [0.75, 0.5, 0.0]),  # validation off: every batch (a matrix of zeros, as if perfect)
    (1, 2, [0.75, 0.5, 0.0]),  # DDP: each of 2 processes reads a batch of its shard
])  # fmt: skip
def test_evaluate_tasks_reads_the_batches_validation_reads(tmp_path: Path, limit, world,
                                                           want) -> None:  # fmt: skip
    """`trainer.limit_val_batches`, a count or a fraction (of 2 batches: 3 examples, then 1):
    the matrix was measured on every batch while `val/*` read the limit's."""
    module, model = naive(tmp_path, limit_val_batches=limit, world_size=world)
    model.set_right([3, 2, 0])  # the first batch: 3 of 3 right, 2 of 3, none
    torch.testing.assert_close(module.evaluate_tasks(), torch.tensor(want))


def test_evaluate_tasks_needs_one_validation_loader_per_task(tmp_path: Path) -> None:
    module, _ = naive(tmp_path)
    module.trainer.datamodule.loaders.pop()
    with pytest.raises(ValueError, match="2 validation loaders for 3 tasks"):
        module.evaluate_tasks()


# -- task boundaries ---------------------------------------------------------------------------
def test_finishing_tasks_fills_the_matrix_row_by_row(tmp_path: Path) -> None:
    """Row i of R is the evaluation right after task i; a task finishes once; every task but
    the last is consolidated; the logged summary is `continual_summary` of the seen block."""
    module, model = naive(tmp_path)
    model.set_right([0, 0, 0])
    module.initial_accuracy = module.evaluate_tasks()  # what on_train_start measures
    rows = [[4, 1, 0], [2, 4, 2], [1, 3, 4]]  # right answers after training task 0, 1, 2
    for task, right in enumerate(rows):
        model.set_right(right)
        module.finish_task(task)
        model.set_right([0, 0, 0])  # a repeated boundary must not re-measure
        module.finish_task(task)
        assert module.finished_tasks == task + 1
    want = torch.tensor(rows, dtype=torch.float32) / N
    torch.testing.assert_close(module.accuracy_matrix, want)
    assert module.consolidated == [0, 1]
    assert len(module.logged) == T
    final = continual_summary(want.numpy(), module.initial_accuracy.numpy(), "acc")
    assert module.logged[-1] == pytest.approx({f"cl/{k}": v for k, v in final.items()})
    assert "cl/bwt" not in module.logged[0]  # one task seen: BWT is NaN and not logged
    with (tmp_path / "continual" / "accuracy_matrix.csv").open() as f:
        table = list(csv.reader(f))
    assert len(table) == T + 1 and [float(c) for c in table[-1][1:]] == want[-1].tolist()


def test_a_half_finished_matrix_holds_nan_for_unfinished_tasks(tmp_path: Path) -> None:
    module, model = naive(tmp_path)
    model.set_right([4, 4, 4])
    module.finish_task(0)
    assert module.accuracy_matrix[0].tolist() == [1.0, 1.0, 1.0]
    assert torch.isnan(module.accuracy_matrix[1:]).all()


def test_a_resumed_run_catches_up_on_missed_boundaries(tmp_path: Path) -> None:
    """Resumed in epoch 4 (task 2 of 3 × 2 epochs) from a checkpoint saved before task 0's
    boundary work: both missed boundaries are finished, in order, before training goes on."""
    module, model = naive(tmp_path, current_epoch=4)
    model.set_right([3, 3, 3])
    module.on_train_epoch_start()
    assert module.finished_tasks == 2 and module.consolidated == [0, 1]
    assert torch.isfinite(module.accuracy_matrix[:2]).all()
    assert torch.isnan(module.accuracy_matrix[2]).all()


@pytest.mark.parametrize(
    ("state", "ends"),
    [
        ({}, [False, True, False, True, False, True]),  # the schedule: every 2nd epoch
        ({"should_stop": True}, [True] * 6),  # early stopping ends the task in progress
        ({"max_steps": 5, "global_step": 5}, [True] * 6),  # so does running out of steps
        ({"max_epochs": 3}, [False, True, True, True, True, True]),  # and the last epoch
    ],
)
def test_a_task_ends_at_its_boundary_or_when_training_stops(
    tmp_path: Path, state: dict[str, Any], ends: list[bool]
) -> None:
    module, _ = naive(tmp_path)
    got = []
    for epoch in range(6):
        attach(module, tmp_path, module.trainer.datamodule, current_epoch=epoch, **state)
        got.append(module._task_ends_now())
    assert got == ends


def test_without_a_stream_the_whole_run_is_one_task(tmp_path: Path) -> None:
    module, _ = naive(tmp_path, datamodule=SimpleNamespace(), current_epoch=7)
    assert module.current_task == 0


# -- the per-task metric of language-model streams --------------------------------------------
def test_lm_streams_score_bits_per_byte_of_each_domain(tmp_path: Path) -> None:
    """Mean NLL in nats over real target tokens (padding dropped) → bits per byte with the
    task's own bytes per token."""
    spec = DataSpec(
        kind="lm",
        vocab_size=5,
        seq_len=3,
        pad_id=4,
        task_names=("code", "prose"),
        extras={"task_bytes_per_token": {"val": [2.0, 4.0], "test": [3.0, 5.0]}},
    )
    module = Recording(LookupModel(), spec)
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[1, 4, 2]])  # the middle position is padding
    scores = module.task_scores({"labels": labels}, ModelOutput(logits, torch.zeros(())))
    want = -logits[0].log_softmax(-1)[[0, 2], [1, 2]]
    torch.testing.assert_close(scores, want)
    assert module.task_value(1, math.log(2) * 4.0).item() == pytest.approx(1.0)
    assert module.task_value(0, math.log(2) * 4.0).item() == pytest.approx(2.0)


def test_a_streams_training_epoch_scores_bits_per_byte_with_its_domains_ratio(
    tmp_path: Path,
) -> None:
    # a domain stream trains one domain per epoch: train/bpb_epoch once took the whole
    # stream's train bytes per token (8% off with BPE on the stdlib domains)
    spec = DataSpec(kind="lm", vocab_size=5, seq_len=3, task_names=("code", "prose"), extras={
        "bytes_per_token": {"train": 3.0, "val": 3.0, "test": 3.0},
        "task_bytes_per_token": {split: [2.0, 4.0] for split in ("train", "val", "test")},
    })  # fmt: skip
    nats = torch.tensor(math.log(2) * 8.0)
    preds, target = torch.zeros(1, 5), torch.zeros(1, dtype=torch.long)
    for joint, want in [(False, 2.0), (True, 8.0 / 3.0)]:  # epoch 2: the second domain's
        module = Recording(LookupModel(), spec, joint=joint)
        attach(module, tmp_path, stream=Stream(num_tasks=2), current_epoch=2)
        module.objective.update("train", nats, preds, target, 1)
        module._log_epoch("train")
        assert module.logged[0]["train/bpb_epoch"] == pytest.approx(want)


# -- expert ownership --------------------------------------------------------------------------
class FakeMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.soft = num_experts, top_k, False


class MoEModel(LookupModel):
    def __init__(self, num_experts: int, top_k: int = 1) -> None:
        super().__init__()
        self.moe = nn.ModuleList([FakeMoE(num_experts, top_k) for _ in range(2)])

    def moe_layers(self) -> list[nn.Module]:
        return list(self.moe)


def test_each_task_owns_a_block_of_experts_and_the_remainder_is_unused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    module = Recording(MoEModel(num_experts=7), expert_masks=True)
    assert module.expert_owner.tolist() == [0, 0, 1, 1, 2, 2, -1]
    # closed to routing, and saved so (a fine-tune of the run keeps them closed)
    assert all(m.open_experts.tolist() == [True] * 6 + [False] for m in module.model.moe)
    attach(module, tmp_path)
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["open_experts"] == [True] * 6 + [False]
    del checkpoint["open_experts"]  # (a checkpoint from before they were closed)
    with caplog.at_level(logging.WARNING, logger="advarch"):
        module.on_load_checkpoint(checkpoint)
    assert "its accuracy matrix so far was measured with them open" in caplog.text
    batch = {"task": torch.tensor([2, 0])}
    mask = module.expert_mask(batch, routing_for_training=True)
    assert mask.tolist() == [[False] * 4 + [True, True, False], [True, True] + [False] * 5]
    with pytest.raises(ValueError, match="fewer than the 3 experts a token is routed to"):
        Recording(MoEModel(num_experts=7, top_k=3), expert_masks=True)


def test_class_incremental_evaluation_routes_over_all_experts(tmp_path: Path) -> None:
    spec = DataSpec(
        kind="classification", num_classes=2, task_names=("a", "b"), extras={"scenario": "class"}
    )
    module = Recording(MoEModel(num_experts=4), spec, expert_masks=True)
    batch = {"task": torch.tensor([1])}
    assert module.expert_mask(batch, routing_for_training=False) is None  # task id unknown
    assert module.expert_mask(batch, routing_for_training=True).tolist() == [
        [False, False, True, True]
    ]


# -- resume state ------------------------------------------------------------------------------
class OtherProcessDiverged:
    """A stand-in DDP strategy whose other process found NaN."""

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return True  # (any process: the other one's)


def test_a_save_stops_every_process_when_one_shard_diverged(tmp_path: Path) -> None:
    # FSDP shards the weights: a NaN in another process's shard only left this one saving
    # while that one raised, and the save's barrier waited for it (a hang, not a stop)
    module, _ = naive(tmp_path, world_size=2, strategy=OtherProcessDiverged())
    with pytest.raises(FloatingPointError, match="a parameter of another process's shard"):
        module.on_save_checkpoint({})


def test_a_step_stops_every_process_when_one_loss_diverged(tmp_path: Path) -> None:
    # DDP: a NaN loss from one process's batch raised there, while the others went on into
    # backward and waited for its gradients in the all-reduce (a hang, not a stop)
    module, _ = naive(tmp_path, world_size=2, strategy=OtherProcessDiverged())
    batch = Stream().loaders[0][0]
    with pytest.raises(FloatingPointError, match="training loss is not finite on another"):
        module.training_step(batch, 0)


def test_the_matrix_survives_a_checkpoint_and_a_different_stream_is_refused(
    tmp_path: Path,
) -> None:
    module, model = naive(tmp_path, current_epoch=2)
    model.set_right([4, 2, 0])
    module.initial_accuracy = torch.tensor([0.5, 0.5, 0.5])
    module.finish_task(0)
    checkpoint: dict[str, Any] = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["continual"]["task"] == 1

    resumed, _ = naive(tmp_path)
    resumed.on_load_checkpoint(checkpoint)
    torch.testing.assert_close(resumed.accuracy_matrix, module.accuracy_matrix, equal_nan=True)
    torch.testing.assert_close(resumed.initial_accuracy, module.initial_accuracy)
    assert resumed.finished_tasks == 1

    other, _ = naive(tmp_path, datamodule=Stream(epochs_per_task=3))
    with pytest.raises(CheckpointError, match=r"3 tasks x 2 epochs; this run has 3 x 3"):
        other.on_load_checkpoint(checkpoint)


def test_bits_per_byte_divide_by_each_splits_own_bytes_per_token() -> None:
    # a BPE tokenizer compresses val and test differently (11% apart on stdlib json/*.py):
    # test/bpb once took the validation split's ratio
    from advarch.strategies.objectives import Objective

    spec = DataSpec(kind="lm", vocab_size=5, seq_len=3, task_names=("code", "prose"), extras={
        "bytes_per_token": {"train": 1.0, "val": 2.0, "test": 4.0},
        "task_bytes_per_token": {"train": [1.0, 1.0], "val": [2.0, 2.0], "test": [3.0, 5.0]},
    })  # fmt: skip
    objective = Objective(spec)
    nats = torch.tensor(math.log(2) * 12.0)
    preds, target = torch.zeros(1, 5), torch.zeros(1, dtype=torch.long)
    for split, task in [("val", None), ("test", None), ("test", 0), ("test", 1)]:
        objective.update(split, nats, preds, target, 1, task)
    assert objective.compute("val")["bpb"].item() == pytest.approx(6.0)
    assert objective.compute("test")["bpb"].item() == pytest.approx(3.0)
    assert objective.compute("test", 0)["bpb"].item() == pytest.approx(4.0)
    assert objective.compute("test", 1)["bpb"].item() == pytest.approx(2.4)


class TensorMoE(FakeMoE):
    """A FakeMoE holding one weight row per expert (`expert_tensors`, as `MoE` has)."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__(num_experts, top_k)
        self.w = nn.Parameter(torch.randn(num_experts, 3))

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        return {"w": self.w}


class TensorMoEModel(LookupModel):
    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.moe = nn.ModuleList([TensorMoE(num_experts, 1) for _ in range(2)])

    def moe_layers(self) -> list[nn.Module]:
        return list(self.moe)


def test_joint_training_with_expert_masks_freezes_no_tasks_experts(tmp_path: Path) -> None:
    """`joint=true` is the multi-task upper bound: every epoch draws from ALL tasks' data, and
    each example is routed to its own task's experts (`expert_mask` in training). No task's
    experts may then be frozen: freezing "earlier tasks'" experts by the epoch's place in the
    schedule leaves task 0's examples training on frozen experts for the rest of the run
    (from epoch `epochs_per_task` on), which is no upper bound."""
    module = Recording(TensorMoEModel(num_experts=6), expert_masks=True, joint=True)
    stream = Stream(epochs_per_task=1)
    attach(module, tmp_path, stream=stream)
    module.setup("fit")
    assert stream.joint  # the stream serves all tasks' data every epoch
    for epoch in range(T):
        module.trainer.current_epoch = epoch
        module.on_train_epoch_start()
        assert module.frozen == [], f"epoch {epoch}: {len(module.frozen)} slices frozen"


def test_evaluating_a_checkpoint_from_before_closed_experts_does_not_say_resumed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # review 37b: eval.py calls `module.on_load_checkpoint` (advarch/eval.py) on a module no
    # Trainer fits: an old expert-mask run's evaluation said `resumed a checkpoint written
    # before …`, about its accuracy-matrix rows, where nothing resumes; what differs there is
    # that the evaluation routes with the unowned experts closed, and its run tested them open
    saved = Recording(MoEModel(num_experts=7), expert_masks=True)
    attach(saved, tmp_path)
    checkpoint: dict[str, Any] = {}
    saved.on_save_checkpoint(checkpoint)
    del checkpoint["open_experts"]  # (a checkpoint from before they were closed)
    evaluated = Recording(MoEModel(num_experts=7), expert_masks=True)  # (as eval.py builds it)
    with caplog.at_level(logging.WARNING, logger="advarch"):
        evaluated.on_load_checkpoint(checkpoint)
    assert "resumed" not in caplog.text, caplog.text
    # (review 38 L5) nor its matrix "from here on": nothing goes on
    assert "its run measured them open; this model routes with them closed" in caplog.text
