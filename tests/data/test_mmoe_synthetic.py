"""Tests of the MMoE synthetic regression data (Ma et al. KDD 2018, section 4.1)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from advarch.data.mmoe_synthetic import MMoESyntheticDataModule, mmoe_synthetic


def mmoe_synthetic_reference(
    num_samples: int, num_features: int, correlation: float, num_sinusoids: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row-by-row transcription of the paper's recipe, with the same random streams."""
    basis, _ = np.linalg.qr(np.random.default_rng([seed, 0]).normal(size=(num_features, 2)))
    u1, u2 = basis[:, 0], basis[:, 1]
    w = [u1, correlation * u1 + math.sqrt(1 - correlation**2) * u2]  # c = 1
    alpha, beta = np.random.default_rng([seed, 1]).normal(size=(2, num_sinusoids))
    x = np.random.default_rng([seed, 2]).normal(size=(num_samples, num_features))
    eps = np.random.default_rng([seed, 3]).normal(scale=0.1, size=(num_samples, 2))
    y = np.zeros((num_samples, 2))
    for n in range(num_samples):
        for i in range(2):
            z = float(w[i] @ x[n])
            y[n, i] = z + sum(math.sin(alpha[k] * z + beta[k]) for k in range(num_sinusoids))
            y[n, i] += eps[n, i]
    return x, y


@pytest.mark.parametrize(("correlation", "seed"), [(0.0, 0), (0.7, 3), (-0.4, 5)])
def test_matches_the_reference(correlation, seed):
    x, y = mmoe_synthetic(40, 12, correlation, num_sinusoids=6, seed=seed)
    x_ref, y_ref = mmoe_synthetic_reference(40, 12, correlation, 6, seed)
    np.testing.assert_allclose(x, x_ref, rtol=1e-6)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def pearson(y: np.ndarray) -> float:
    return float(np.corrcoef(y[:, 0], y[:, 1])[0, 1])


def test_label_correlation_increases_with_p():
    correlations = [pearson(mmoe_synthetic(8000, 100, p, seed=0)[1]) for p in (0.0, 0.5, 0.9)]
    assert correlations[0] < correlations[1] < correlations[2]
    assert abs(correlations[0]) < 0.1 and correlations[2] > 0.6


def test_p_changes_only_the_second_task():
    x0, y0 = mmoe_synthetic(100, 20, 0.1, seed=7)
    x1, y1 = mmoe_synthetic(100, 20, 0.8, seed=7)
    assert np.array_equal(x0, x1) and np.array_equal(y0[:, 0], y1[:, 0])
    assert not np.allclose(y0[:, 1], y1[:, 1])
    _, y_same = mmoe_synthetic(100, 20, 1.0, seed=7)  # identical tasks up to the label noise
    assert np.abs(y_same[:, 0] - y_same[:, 1]).max() < 1.0  # noise difference: std 0.14


def test_datamodule_batches_splits_and_spec():
    dm = MMoESyntheticDataModule(
        num_features=16, num_samples=300, val_samples=50, test_samples=40, batch_size=32
    )
    dm.setup()
    dm.setup()  # idempotent
    spec = dm.spec
    assert (spec.kind, spec.num_features, spec.num_classes) == ("regression", 16, 1)
    assert spec.task_names == ("task_a", "task_b") and spec.num_tasks == 2
    assert [len(dm.data[k]) for k in ("train", "val", "test")] == [210, 50, 40]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"inputs", "targets"}
    assert batch["inputs"].shape == (32, 16) and batch["inputs"].dtype == torch.float32
    assert batch["targets"].shape == (32, 2) and batch["targets"].dtype == torch.float32
    _, y = mmoe_synthetic(300, 16, 0.5, seed=0)
    val_targets = torch.cat([b["targets"] for b in dm.val_dataloader()])
    np.testing.assert_array_equal(val_targets.numpy(), y[210:260])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"correlation": 1.5}, "data.correlation=1.5"),
        ({"num_features": 1}, "data.num_features=1"),
        ({"num_samples": 100, "val_samples": 60, "test_samples": 40}, "data.num_samples=100"),
    ],
)
def test_invalid_config_names_the_key(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MMoESyntheticDataModule(**kwargs)
