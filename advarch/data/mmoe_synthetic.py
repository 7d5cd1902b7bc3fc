"""Synthetic two-task regression with controllable task correlation.

Ma et al., KDD 2018, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", section 4.1:

    u1, u2 orthonormal in R^d;  w1 = c * u1;  w2 = c * (p * u1 + sqrt(1 - p^2) * u2)
    x ~ N(0, I_d)
    y_i = w_i^T x + sum_{k=1..m} sin(alpha_k * w_i^T x + beta_k) + eps_i,   eps_i ~ N(0, 0.01)

p = cos(w1, w2) is the task correlation; the label Pearson correlation grows with p but is not
equal to it because of the sinusoids. The paper leaves alpha_k, beta_k and c unspecified; here
alpha_k, beta_k ~ N(0, 1) i.i.d. (m = `num_sinusoids` = 10 by default), c = `scale` = 1, and
N(0, 0.01) is read as variance 0.01 (noise std 0.1), as in drawbridge/keras-mmoe.

Each random component has its own stream `np.random.default_rng([seed, k])` (k = 0 basis,
1 sinusoids, 2 inputs, 3 noise), so datasets that differ only in p share u1, u2, alpha, beta,
x and eps: a sweep over p changes nothing but the task relationship.

Batches: `inputs` (B, F) float32, `targets` (B, 2) float32. There is no `task` key: every
example carries targets for both tasks, and the multi-task strategy trains both per batch.

Shapes: B batch, F features (d), N samples, m sinusoids.
"""

from __future__ import annotations

import datasets
import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from advarch.data.loaders import make_dataset, make_loader
from advarch.data.sampling import resumable_loader
from advarch.spec import DataSpec

TASK_NAMES = ("task_a", "task_b")


def mmoe_synthetic(
    num_samples: int,
    num_features: int = 100,
    correlation: float = 0.5,
    num_sinusoids: int = 10,
    scale: float = 1.0,
    noise_std: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw the MMoE synthetic data (module docstring).

    Returns:
        `(x (N, F) float32, y (N, 2) float32)`.
    """
    basis, _ = np.linalg.qr(np.random.default_rng([seed, 0]).normal(size=(num_features, 2)))
    u1, u2 = basis.T  # orthonormal (F,)
    weights = scale * np.stack([u1, correlation * u1 + np.sqrt(1 - correlation**2) * u2])  # (2, F)
    alpha, beta = np.random.default_rng([seed, 1]).normal(size=(2, num_sinusoids, 1, 1))
    x = np.random.default_rng([seed, 2]).normal(size=(num_samples, num_features))
    eps = np.random.default_rng([seed, 3]).normal(scale=noise_std, size=(num_samples, 2))
    z = x @ weights.T  # (N, 2)
    y = z + np.sin(alpha * z + beta).sum(0) + eps  # sum over the m sinusoids
    return x.astype(np.float32), y.astype(np.float32)


class MMoESyntheticDataModule(L.LightningDataModule):
    """The MMoE synthetic regression pair (module docstring) as a LightningDataModule.

    The first `num_samples - val_samples - test_samples` rows train, the next `val_samples`
    validate, the last `test_samples` test (rows are i.i.d., so a contiguous split is fair).

    Args:
        correlation: task correlation p = cos(w1, w2), in [-1, 1].
        num_features: input dimension d.
        num_samples: rows drawn in total.
        val_samples: rows held out for validation.
        test_samples: rows held out for testing.
        num_sinusoids: m, sinusoids added to each label.
        scale: c, the norm of w1 and w2.
        noise_std: standard deviation of the label noise (0.1 = variance 0.01).
        seed: seed of all random draws.
        batch_size: examples per batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        correlation: float = 0.5,
        num_features: int = 100,
        num_samples: int = 12000,
        val_samples: int = 1000,
        test_samples: int = 1000,
        num_sinusoids: int = 10,
        scale: float = 1.0,
        noise_std: float = 0.1,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not -1.0 <= correlation <= 1.0:
            raise ValueError(f"data.correlation={correlation} must be in [-1, 1]")
        if num_features < 2:
            raise ValueError(
                f"data.num_features={num_features} must be >= 2 (u1 is orthogonal to u2)"
            )
        if not scale > 0:
            raise ValueError(f"data.scale={scale} must be > 0")
        if not noise_std >= 0:
            raise ValueError(f"data.noise_std={noise_std} must be >= 0")
        if num_samples - val_samples - test_samples < 1 or min(val_samples, test_samples) < 1:
            raise ValueError(
                f"data.num_samples={num_samples} must exceed data.val_samples={val_samples} + "
                f"data.test_samples={test_samples}, both >= 1"
            )
        self.correlation = correlation
        self.num_features = num_features
        self.num_samples = num_samples
        self.val_samples = val_samples
        self.test_samples = test_samples
        self.num_sinusoids = num_sinusoids
        self.scale = scale
        self.noise_std = noise_std
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.spec = DataSpec(
            kind="regression",
            num_features=num_features,
            num_classes=1,
            task_names=TASK_NAMES,
            extras={"correlation": correlation},
        )
        self.data: dict[str, datasets.Dataset] = {}

    def setup(self, stage: str | None = None) -> None:
        """Draw the data once and cut it into train/val/test (idempotent)."""
        if self.data:
            return
        x, y = mmoe_synthetic(
            self.num_samples,
            self.num_features,
            self.correlation,
            self.num_sinusoids,
            self.scale,
            self.noise_std,
            self.seed,
        )
        n_train = self.num_samples - self.val_samples - self.test_samples
        bounds = {
            "train": slice(0, n_train),
            "val": slice(n_train, n_train + self.val_samples),
            "test": slice(n_train + self.val_samples, None),
        }
        self.data = {k: make_dataset({"inputs": x[s], "targets": y[s]}) for k, s in bounds.items()}

    def _loader(self, split: str) -> DataLoader:
        return make_loader(
            self.data[split], self.batch_size, False, self.seed, self.num_workers, self.trainer
        )

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self.data["train"], self.batch_size, self.seed, self.trainer,
                                num_workers=self.num_workers)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
