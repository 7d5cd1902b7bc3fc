"""Episodic few-shot learning: prototypical networks with optional support-set adaptation.

Prototypical Networks (Snell et al. 2017, eq. 1-2): embed support and query with the model's
pooled `features`, class prototypes are the mean support embeddings c_n = mean_{i: y_i = n}
f(x_i), and the query logits are the negative squared Euclidean distances −||f(q) − c_n||².
Training minimises the query cross-entropy of one N-way K-shot episode per batch.

Adaptation on the support set (`adaptation`), applied before predicting each evaluation query:

- `none`: the ProtoNet classifier as it is.
- `finetune_head`: the body is frozen; a fresh linear head, initialised to the prototype
  classifier W = 2 c, b = −||c||² (Triantafillou et al. 2020, "Proto-MAML" init; its logits
  differ from ProtoNet's by the per-query constant −||f(q)||², so 0 steps equals `none`), takes
  `adapt_steps` SGD steps of learning rate `adapt_lr` on the support cross-entropy.
- `fomaml`: first-order MAML (Finn et al. 2017, §5.2) over the whole model plus that
  prototype-initialised head. Inner loop: θ' ← θ' − α · stopgrad(∇ L_support(θ')); the outer
  (training) loss is the query loss at θ', whose gradient reaches θ through the identity
  (first-order) and through the prototype head initialisation. Used in training and evaluation.

Evaluation never reads the query labels before the logits exist (`episode_logits` receives only
support, support labels and query inputs); accuracy is averaged over the episodes with a 95%
confidence half-width 1.96 · std / √n, next to the raw-input ProtoNet baseline
(`<split>/raw_proto_acc`).

Shapes: N ways, K shots, Q queries per class, S = N·K support, M = N·Q query examples,
D feature width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch._functorch import config as functorch_config
from torch.func import functional_call

from advarch.models.output import ModelOutput, output_layer_globs
from advarch.spec import DataSpec
from advarch.strategies.base import BaseStrategy
from advarch.strategies.objectives import WeightedMean
from advarch.strategies.optimization import parameter_groups

Adaptation = Literal["none", "finetune_head", "fomaml"]
ADAPTATIONS = ("none", "finetune_head", "fomaml")
SPLITS = ("train", "val", "test")


def prototypes(support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Class means of support embeddings: (S, D), (S,) → (N, D)."""
    one_hot = F.one_hot(labels, n_way).to(support.dtype)  # (S, N)
    return (one_hot.T @ support) / one_hot.sum(0).clamp_min(1).unsqueeze(-1)


def prototype_logits(query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distances (M, D), (N, D) → (M, N) (Snell et al. eq. 2)."""
    return -(query.unsqueeze(1) - protos.unsqueeze(0)).pow(2).sum(-1)


def raw_prototype_accuracy(episode: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Query accuracy of the nearest class mean on an episode's raw inputs (float64): how
    hard the episodes are before any learning, the baseline `raw_proto_acc`."""
    support = episode["support"].flatten(1).cpu().double()  # (float64: not on every device)
    query = episode["query"].flatten(1).cpu().double()
    labels = episode["support_labels"].cpu()
    logits = prototype_logits(query, prototypes(support, labels, int(labels.max()) + 1))
    return (logits.argmax(1) == episode["query_labels"].cpu()).double().mean()


def prototype_head(protos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear head equivalent to ProtoNet up to a per-query constant: W = 2c, b = −||c||²."""
    return 2 * protos, -protos.pow(2).sum(-1)


def mean_ci95(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean and 95% confidence half-width 1.96 · std(ddof=1) / √n of per-episode values;
    no half-width for one episode (its spread is unknown, not 0)."""
    values = values.double().flatten()
    if values.numel() < 2:
        return values.mean(), None
    return values.mean(), 1.96 * values.std() / math.sqrt(values.numel())


class FewShotStrategy(BaseStrategy):
    """Prototypical-network episodes with support-set adaptation (module docstring).

    Args:
        base: `BaseStrategy`'s options (optimizer, scheduler, aux_loss_weight).
        adaptation: `none`, `finetune_head` or `fomaml`.
        adapt_steps: SGD steps on the support set (`finetune_head`, `fomaml`).
        adapt_lr: learning rate of those steps.

    Raises:
        ValueError: for non-episodic data or invalid adaptation settings.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        *,
        adaptation: Adaptation = "none",
        adapt_steps: int = 10,
        adapt_lr: float = 0.01,
        **base: Any,
    ) -> None:
        if "n_way" not in spec.extras:
            raise ValueError(
                "strategy=fewshot needs episodic data (data=fewshot_synthetic or "
                f"data=fewshot_rotated_digits); data {spec.task_names[0]!r} yields ordinary batches"
            )
        if adaptation not in ADAPTATIONS:
            raise ValueError(
                f"strategy.adaptation={adaptation!r} is not one of: {', '.join(ADAPTATIONS)}"
            )
        if adapt_steps < 0 or adapt_lr <= 0:
            raise ValueError(
                f"strategy.adapt_steps={adapt_steps} must be >= 0 and "
                f"strategy.adapt_lr={adapt_lr} > 0"
            )
        # the episode loss reads the pooled features alone: the model's output layers learn
        # nothing (and DDP stops at the first step on parameters without a gradient)
        for parameter in output_layers(model):
            parameter.requires_grad_(False)
        super().__init__(model, spec, **base)  # (its parameter counts: those frozen too)
        self.n_way = spec.extras["n_way"]
        self.episode_metrics = nn.ModuleDict({f"{s}_": self._metric_set() for s in SPLITS})

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint from before the output layers were frozen holds an optimizer over them
        too (torch refuses its groups' sizes): their entries go, and it resumes (they never
        stepped: no gradient reached them)."""
        super().on_load_checkpoint(checkpoint)
        frozen = output_layers(self.model)
        for parameter in frozen:
            parameter.requires_grad_(True)
        before = parameter_groups(self.model)  # (the groups as that optimizer was built)
        for parameter in frozen:
            parameter.requires_grad_(False)
        sizes = [len(group["params"]) for group in before]
        gone = {id(p) for p in frozen}
        for saved in checkpoint.get("optimizer_states", []):
            if not gone or [len(g["params"]) for g in saved["param_groups"]] != sizes:
                continue  # (written with them frozen)
            for group, built in zip(saved["param_groups"], before, strict=True):
                kept = [i for i, p in zip(group["params"], built["params"], strict=True)
                        if id(p) not in gone]  # fmt: skip
                for index in set(group["params"]) - set(kept):
                    saved["state"].pop(index, None)
                group["params"] = kept

    @staticmethod
    def _metric_set() -> nn.ModuleDict:
        return nn.ModuleDict(
            {
                "loss": WeightedMean(),
                "acc": torchmetrics.CatMetric(),
                "raw_proto_acc": torchmetrics.CatMetric(),
            }
        )

    # -- embedding and adaptation -------------------------------------------------------------
    def embed(
        self, inputs: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
    ) -> ModelOutput:
        """Model output for (B, …) inputs whose `features` (B, D) are the embedding."""
        out = (
            self.model(inputs) if params is None else functional_call(self.model, params, (inputs,))
        )
        if out.features is None:
            raise ValueError(
                "strategy=fewshot needs a model that returns pooled features "
                "(model kind classification/regression)"
            )
        return out

    def episode_logits(self, episode: Mapping[str, torch.Tensor]) -> ModelOutput:
        """Query logits (M, N) of one episode after adaptation on its support set.

        Reads only `support`, `support_labels` and `query`: never the query labels.
        """
        support, labels, query = episode["support"], episode["support_labels"], episode["query"]
        if self.hparams.adaptation == "fomaml":
            return self._fomaml(support, labels, query)
        s, q = self.embed(support), self.embed(query)
        protos = prototypes(s.features, labels, self.n_way)  # (N, D)
        if self.hparams.adaptation == "finetune_head" and not self.training:
            logits = self._finetune_head(s.features, labels, q.features, protos)
        else:
            logits = prototype_logits(q.features, protos)  # (M, N)
        return _merge(logits, s, q)

    def _finetune_head(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, protos: torch.Tensor
    ) -> torch.Tensor:
        """Fit a prototype-initialised linear head on frozen support features; query logits."""
        with torch.inference_mode(False), torch.enable_grad():
            # clones: tensors made under Lightning's inference mode cannot enter autograd
            support, query, labels = (t.detach().clone() for t in (support, query, labels))
            w, b = (t.detach().clone().requires_grad_() for t in prototype_head(protos.detach()))
            optimizer = torch.optim.SGD([w, b], lr=self.hparams.adapt_lr)
            for _ in range(self.hparams.adapt_steps):
                optimizer.zero_grad()
                F.cross_entropy(support @ w.T + b, labels).backward()
                optimizer.step()
            return (query @ w.T + b).detach()  # (M, N)

    def _fomaml(
        self, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor
    ) -> ModelOutput:
        """First-order Proto-MAML: inner SGD on the support, query logits at the adapted weights.

        The head starts at the prototypes' (W₀, b₀) and adapts as variables of its own (no
        inner gradient through its initialisation: Triantafillou et al. 2020); the query
        logits add W₀ − sg(W₀) back, so training reaches the body through the prototypes too.
        In training the result carries gradients to the model (first-order); in evaluation it
        is detached.
        """
        # (a compiled model's graph donates its buffers, which the retained inner backward needs)
        no_donation = functorch_config.patch(donated_buffer=False)
        with torch.inference_mode(False), torch.enable_grad(), no_donation:
            support, query, labels = (t.clone() for t in (support, query, labels))
            fast = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
            s = self.embed(support, fast)
            head = prototype_head(prototypes(s.features, labels, self.n_way))
            fast["__w"], fast["__b"] = (t.detach().requires_grad_() for t in head)
            for _ in range(self.hparams.adapt_steps):
                s = self.embed(support, _body(fast))
                loss = F.cross_entropy(s.features @ fast["__w"].T + fast["__b"], labels)
                grads = torch.autograd.grad(
                    loss, list(fast.values()), allow_unused=True, retain_graph=True
                )  # (the support pass's aux loss still trains)
                fast = {
                    n: p if g is None else p - self.hparams.adapt_lr * g.detach()
                    for (n, p), g in zip(fast.items(), grads, strict=True)
                }
            w, b = (fast[n] + (t - t.detach()) for n, t in zip(("__w", "__b"), head, strict=True))
            q = self.embed(query, _body(fast))
            out = _merge(q.features @ w.T + b, s, q)
        if not self.training:
            out = ModelOutput(out.logits.detach(), out.aux_loss.detach(), out.stats)
        return out

    def model_passes(self, episode: Mapping[str, torch.Tensor]) -> float:
        """Forward + backward passes of the model per example a training episode counts
        (MFU's FLOPs): first-order MAML adapts on the support `adapt_steps` times besides the
        pass over support and query that the others make."""
        if self.hparams.adaptation != "fomaml":
            return 1.0
        shots, queries = len(episode["support"]), len(episode["query"])
        return 1.0 + self.hparams.adapt_steps * shots / (shots + queries)

    # -- steps --------------------------------------------------------------------------------
    def shared_step(
        self, batch: dict[str, torch.Tensor], split: str
    ) -> tuple[torch.Tensor, ModelOutput]:
        """Query cross-entropy of one episode; records episode accuracy."""
        if "support" not in batch:
            raise ValueError("strategy=fewshot needs episode batches (support/query keys)")
        out = self.episode_logits(batch)
        labels = batch["query_labels"]
        loss = F.cross_entropy(out.logits.float(), labels)
        m = self.episode_metrics[f"{split}_"]
        m["loss"].update(loss.detach())
        m["acc"].update((out.logits.argmax(-1) == labels).float().mean().detach())
        if split != "train":
            m["raw_proto_acc"].update(raw_prototype_accuracy(batch).float())
        return loss, out

    def metric_names(self) -> list[str]:
        episodic = ("loss", "acc", "acc_ci95", "raw_proto_acc", "raw_proto_acc_ci95")
        evaluated = [f"{s}/{k}" for s in ("val", "test") for k in episodic]
        return [*super().metric_names(), *evaluated, *(f"train/{k}_epoch" for k in episodic)]

    def training_metrics(self) -> Mapping[str, torchmetrics.Metric]:
        return self.episode_metrics["train_"]

    def _log_epoch(self, split: str) -> None:
        m = self.episode_metrics[f"{split}_"]
        if not m["loss"].update_count:
            return
        acc, acc_ci = mean_ci95(m["acc"].compute())
        values = {"loss": m["loss"].compute(), "acc": acc, "acc_ci95": acc_ci}
        if m["raw_proto_acc"].update_count:
            values["raw_proto_acc"], values["raw_proto_acc_ci95"] = mean_ci95(
                m["raw_proto_acc"].compute()
            )
        for metric in m.values():
            metric.reset()
        suffix = "_epoch" if split == "train" else ""  # apart from the per-step train/loss
        self.log_dict(
            {f"{split}/{k}{suffix}": v.float() for k, v in values.items() if v is not None},
            prog_bar=split == "val",
        )


def _body(fast: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's parameters among the fast weights (drops the `__w`/`__b` head)."""
    return {n: p for n, p in fast.items() if not n.startswith("__")}


def _merge(logits: torch.Tensor, *outs: ModelOutput) -> ModelOutput:
    """Query logits with the summed aux losses and the query pass's stats."""
    aux = torch.stack([o.aux_loss for o in outs]).sum()
    return ModelOutput(logits=logits, aux_loss=aux, stats=outs[-1].stats)


def output_layers(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters after its pooled features (`output_layer_globs`)."""
    globs = output_layer_globs(model)
    return [p for n, p in model.named_parameters() if any(fnmatchcase(n, g) for g in globs)]
