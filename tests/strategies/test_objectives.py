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
