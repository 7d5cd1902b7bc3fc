"""Epoch metrics count every target once, however the batches cut them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advarch.models.output import ModelOutput
from advarch.spec import DataSpec
from advarch.strategies.objectives import Objective, WeightedMean, load_metrics_state


def test_an_epoch_loss_is_the_loss_over_all_its_targets() -> None:
    # torchmetrics' MeanMetric(nan_strategy="disable") drops the weights: the last batch of
    # one sentence counted as much as a full one, and padded tokens' batches likewise
    spec = DataSpec(kind="lm", vocab_size=7, seq_len=5, pad_id=0)
    objective = Objective(spec)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, 7, generator=g)
    labels = torch.randint(1, 7, (5, 5), generator=g)
    labels[4, 2:] = 0  # padding: the last sequence counts 2 targets
    for rows in (slice(0, 4), slice(4, 5)):  # a full batch, then a short one
        out = ModelOutput(logits=logits[rows], aux_loss=torch.zeros(()))
        loss, preds, target, weight = objective.loss(out, {"labels": labels[rows]})
        objective.update("val", loss, preds, target, weight)
    everything = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=0)
    assert objective.compute("val")["loss"].item() == pytest.approx(everything.item(), rel=1e-6)


def test_a_nan_stays_in_the_mean_and_old_checkpoints_states_load() -> None:
    mean = WeightedMean()
    mean.update(torch.tensor(2.0), weight=3)
    mean.update(torch.tensor(float("nan")), weight=0)  # no counted target: nothing to add
    assert mean.compute().item() == 2.0
    mean.update(torch.tensor(float("nan")), weight=1)
    assert mean.compute().isnan()  # a diverged batch is not dropped from the epoch's loss
    # a checkpoint's states (Σ value·weight, Σ weight, MeanMetric's names) resume
    state = {"tensors": {"mean_value": torch.tensor(6.0), "weight": torch.tensor(3.0)},
             "updates": 1}  # fmt: skip
    resumed = {"loss": WeightedMean()}
    load_metrics_state(resumed, {"loss": state})
    resumed["loss"].update(torch.tensor(4.0), weight=1)
    assert resumed["loss"].compute().item() == pytest.approx(2.5)


def test_the_step_train_loss_is_the_task_loss_and_the_optimised_adds_the_parts() -> None:
    # train/loss per step included the aux loss (and EWC's penalty) while train/loss_epoch and
    # val/loss did not: 2.302 beside 2.292 in one table
    from types import SimpleNamespace

    from torch import nn

    from advarch.strategies.base import BaseStrategy

    class WithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1, 5)

        def forward(self, inputs: torch.Tensor, **_: object) -> ModelOutput:
            logits = self.head(inputs.float().unsqueeze(-1))
            return ModelOutput(logits=logits, aux_loss=torch.tensor(2.0))

    spec = DataSpec(kind="lm", vocab_size=5, seq_len=3)
    module = BaseStrategy(WithAux(), spec, aux_loss_weight=0.5)
    logged: dict[str, float] = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    module.log_dict = lambda values, **_: None
    module._trainer = SimpleNamespace(world_size=1)
    batch = {"input_ids": torch.tensor([[0, 1, 2]]), "labels": torch.tensor([[1, 2, 3]])}
    out = module.training_step(batch, 0)
    task = F.cross_entropy(module.model(batch["input_ids"]).logits[0], batch["labels"][0])
    assert logged["train/loss"] == pytest.approx(float(task))
    assert logged["train/aux_loss"] == 2.0
    assert float(out["loss"]) == pytest.approx(float(task) + 0.5 * 2.0)
