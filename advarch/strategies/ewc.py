"""Elastic Weight Consolidation on a task stream.

EWC (Kirkpatrick et al. 2017, eq. 3) adds, for every finished task k, a quadratic penalty
that pulls each parameter towards its value θ*_k at the end of task k in proportion to its
diagonal Fisher information F_k:

    L(θ) = L_task(θ) + Σ_k ½ λ Σ_i F_k,i (θ_i − θ*_k,i)²                    (mode: separate)

Online EWC (Schwarz et al. 2018, "Progress & Compress", eq. 8) keeps one running importance
and one anchor: F ← γ F + F_new and θ* ← θ at the end of the newest task:

    L(θ) = L_task(θ) + ½ λ Σ_i F_i (θ_i − θ*_i)²                             (mode: online)

Consolidation runs at each task boundary (`ContinualStrategy.consolidate`) on
`fisher_samples` examples of the finished task's training set, with the estimator chosen by
`fisher_estimator` (`strategies/fisher.py`). Importances and anchors are stored in the
checkpoint under `ewc`, so a resumed run continues the same consolidation.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from advarch.spec import DataSpec
from advarch.strategies.continual import ContinualStrategy
from advarch.strategies.fisher import Estimator, FisherEstimator, Params

Mode = Literal["separate", "online"]
SEQUENCE_ESTIMATORS = ("empirical", "batched")  # the Fisher estimators defined for sequences


def ewc_penalty(
    params: dict[str, torch.Tensor],
    importances: list[Params],
    anchors: list[Params],
    strength: float,
) -> torch.Tensor:
    """½ λ Σ_k Σ_i F_k,i (θ_i − θ*_k,i)² over the names each (F_k, θ*_k) holds."""
    terms = [
        (fisher[name] * (params[name] - anchor[name]).pow(2)).sum()
        for fisher, anchor in zip(importances, anchors, strict=True)
        for name in fisher
    ]
    return 0.5 * strength * torch.stack(terms).sum()


class EWCStrategy(ContinualStrategy):
    """Sequential training with the EWC penalty (`strategy=ewc`).

    Args:
        continual: `ContinualStrategy`'s options (expert masks, joint …) and `BaseStrategy`'s
            (optimizer, scheduler, aux_loss_weight).
        ewc_lambda: penalty strength λ.
        mode: `separate` (one (F, θ*) per task, summed) or `online` (decayed F, latest θ*).
        gamma: online-EWC decay γ of the old importance (1 = plain accumulation).
        fisher_estimator: `empirical`, `sampled`, `exact` or `batched`.
        fisher_samples: examples of the finished task used for the Fisher.
        fisher_chunk_size: examples per vectorised chunk (also the `batched` minibatch size).
    """

    strategy_name = "ewc"

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        *,
        ewc_lambda: float = 10000.0,
        mode: Mode = "separate",
        gamma: float = 1.0,
        fisher_estimator: Estimator = "empirical",
        fisher_samples: int = 64,
        fisher_chunk_size: int = 32,
        **continual: Any,
    ) -> None:
        super().__init__(model, spec, **continual)
        if ewc_lambda < 0:
            raise ValueError(f"strategy.ewc_lambda={ewc_lambda} must be >= 0")
        if mode not in ("separate", "online"):
            raise ValueError(f"strategy.mode={mode!r} must be 'separate' or 'online'")
        if not 0 < gamma <= 1:
            raise ValueError(f"strategy.gamma={gamma} must be in (0, 1]")
        if spec.kind == "lm" and fisher_estimator not in SEQUENCE_ESTIMATORS:
            raise ValueError(
                f"strategy.fisher_estimator={fisher_estimator} does not apply to language "
                f"models; use one of: {', '.join(SEQUENCE_ESTIMATORS)}"
            )
        self.fisher = FisherEstimator(fisher_estimator, fisher_samples, fisher_chunk_size)
        self.importances: list[Params] = []  # F_k per consolidated task (one entry when online)
        self.anchors: list[Params] = []  # θ*_k, same layout

    def consolidate(self, task: int) -> None:
        """Estimate F on task `task`'s training data and anchor θ* at the current weights."""
        seed = self._stream().seed + task
        loader = self.task_train_loader(task, self.hparams.fisher_chunk_size, seed)
        batches = ({**b, "labels": self.scored_labels(b["labels"])} for b in self._batches(loader))
        fisher = self.fisher(self.model, batches, self.log_probs, seed=seed)
        anchor = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in fisher}
        self.add_consolidation(fisher, anchor)

    def add_consolidation(self, fisher: Params, anchor: Params) -> None:
        """Store one task's (F, θ*): appended (separate) or merged as γF_old + F (online)."""
        if self.hparams.mode == "online" and self.importances:
            gamma = self.hparams.gamma
            old = self.importances[0]
            fisher = {n: gamma * old[n] + f for n, f in fisher.items()}
            self.importances, self.anchors = [fisher], [anchor]
        else:
            self.importances.append(fisher)
            self.anchors.append(anchor)

    def extra_loss(self) -> torch.Tensor | None:
        if not self.importances:
            return None
        params = dict(self.model.named_parameters())
        device = next(iter(params.values())).device
        if next(iter(self.anchors[0].values())).device != device:  # loaded on CPU, model moved
            self.importances = [{n: t.to(device) for n, t in d.items()} for d in self.importances]
            self.anchors = [{n: t.to(device) for n, t in d.items()} for d in self.anchors]
        return ewc_penalty(params, self.importances, self.anchors, self.hparams.ewc_lambda)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ewc"] = {"importances": self.importances, "anchors": self.anchors}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ewc")
        if state is not None:
            self.importances, self.anchors = list(state["importances"]), list(state["anchors"])
