"""Few-shot strategy: prototype math, CI, no query-label access, adaptation, runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advarch.config.validate import ConfigError
from advarch.models import Model
from advarch.models.output import ModelOutput
from advarch.spec import DataSpec
from advarch.strategies.fewshot import (
    FewShotStrategy,
    mean_ci95,
    prototype_logits,
    prototypes,
)
from advarch.train import run
from tests.strategies.conftest import FAST, fitting_models, model_overrides

N_WAY = 3
SPEC = DataSpec(
    kind="classification",
    num_features=8,
    num_classes=N_WAY,
    task_names=("synthetic",),
    extras={"n_way": N_WAY, "k_shot": 2, "n_query": 2},
)
SMALL_EPISODES = ["data.val_episodes=4", "data.test_episodes=6", "data.episodes_per_epoch=4"]


class LinearEmbedder(nn.Module):
    """A linear map as the embedding; features = logits = W x."""

    def __init__(self, width: int = 8, dim: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(width, dim)

    def forward(self, inputs: torch.Tensor) -> ModelOutput:
        z = self.proj(inputs)
        return ModelOutput(logits=z, aux_loss=z.new_zeros(()), features=z)


class QueryLabelsForbidden(dict):
    """An episode that fails loudly if anyone reads its query labels or class ids."""

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in ("query_labels", "classes"):
            raise AssertionError(f"adaptation read {key}")
        return super().__getitem__(key)


def episode(seed: int = 0, k_shot: int = 2, n_query: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "support": torch.randn(N_WAY * k_shot, 8, generator=g),
        "support_labels": torch.arange(N_WAY).repeat_interleave(k_shot),
        "query": torch.randn(N_WAY * n_query, 8, generator=g),
        "query_labels": torch.randperm(N_WAY * n_query, generator=g) % N_WAY,
        "classes": torch.tensor([7, 3, 5]),
    }


def strategy(adaptation: str = "none", steps: int = 5, lr: float = 0.1) -> FewShotStrategy:
    torch.manual_seed(0)
    return FewShotStrategy(
        LinearEmbedder(), SPEC, adaptation=adaptation, adapt_steps=steps, adapt_lr=lr
    )


def test_prototype_logits_match_hand_computation() -> None:
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [0.0, 2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    protos = prototypes(support, labels, 2)
    torch.testing.assert_close(protos, torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
    query = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    # ||(1,1)-(1,0)||² = 1, ||(1,1)-(0,3)||² = 1 + 4 = 5; ||0-(1,0)||² = 1, ||0-(0,3)||² = 9
    expected = -torch.tensor([[1.0, 5.0], [1.0, 9.0]])
    torch.testing.assert_close(prototype_logits(query, protos), expected)


def test_prototypes_do_not_depend_on_support_order() -> None:
    ep = episode(1)
    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    a = prototypes(ep["support"], ep["support_labels"], N_WAY)
    b = prototypes(ep["support"][order], ep["support_labels"][order], N_WAY)
    torch.testing.assert_close(a, b)


def test_ci95_formula() -> None:
    mean, ci = mean_ci95(torch.tensor([0.0, 1.0, 1.0, 1.0]))
    # std(ddof=1) of (0, 1, 1, 1) = 0.5; 1.96 · 0.5 / √4 = 0.49
    assert mean.item() == pytest.approx(0.75) and ci.item() == pytest.approx(0.49)
    values = np.random.default_rng(0).random(600)
    _, ci = mean_ci95(torch.from_numpy(values))
    assert ci.item() == pytest.approx(1.96 * values.std(ddof=1) / math.sqrt(600))
    assert mean_ci95(torch.tensor([0.4]))[1].item() == 0.0


@pytest.mark.parametrize("adaptation", ["none", "finetune_head", "fomaml"])
def test_adaptation_never_reads_query_labels(adaptation: str) -> None:
    s = strategy(adaptation).eval()
    guarded = QueryLabelsForbidden(episode())
    out = s.episode_logits(guarded)
    assert out.logits.shape == (6, N_WAY)
    # and the predictions do not change when the query labels do
    relabelled = {**episode(), "query_labels": torch.zeros(6, dtype=torch.long)}
    torch.testing.assert_close(s.episode_logits(relabelled).logits, out.logits)


def test_finetune_head_with_zero_steps_equals_protonet() -> None:
    ep = episode(2)
    proto = strategy("none").eval().episode_logits(ep).logits
    head = strategy("finetune_head", steps=0).eval().episode_logits(ep).logits
    labels = ep["query_labels"]
    assert F.cross_entropy(head, labels).item() == pytest.approx(
        F.cross_entropy(proto, labels).item(), rel=1e-5
    )
    assert torch.equal(head.argmax(-1), proto.argmax(-1))


def test_finetune_head_lowers_support_loss_and_leaves_body_untouched() -> None:
    s = strategy("finetune_head", steps=20, lr=0.05).eval()
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    ep = episode(3)
    support_as_query = {**ep, "query": ep["support"]}
    start = F.cross_entropy(
        strategy("none").eval().episode_logits(support_as_query).logits, ep["support_labels"]
    )
    end = F.cross_entropy(s.episode_logits(support_as_query).logits, ep["support_labels"])
    assert end < start
    for k, v in s.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def fomaml_reference(
    model: LinearEmbedder, ep: dict[str, torch.Tensor], lr: float, second_order: bool = False
) -> torch.Tensor:
    """One Proto-MAML step written out by hand for the linear embedder.

    First order: the inner gradients are constants (detached); `second_order=True` keeps their
    graph (double backward), the term first-order MAML drops.
    """
    w, b = model.proj.weight, model.proj.bias
    z = ep["support"] @ w.T + b
    c = prototypes(z, ep["support_labels"], N_WAY)
    hw, hb = 2 * c, -(c**2).sum(-1)
    loss = F.cross_entropy(z @ hw.T + hb, ep["support_labels"])
    grads = torch.autograd.grad(loss, (w, b, hw, hb), create_graph=second_order, retain_graph=True)
    gw, gb, ghw, ghb = grads if second_order else (g.detach() for g in grads)
    w2, b2, hw2, hb2 = w - lr * gw, b - lr * gb, hw - lr * ghw, hb - lr * ghb
    return (ep["query"] @ w2.T + b2) @ hw2.T + hb2


def test_fomaml_matches_reference_step_and_is_first_order() -> None:
    s = strategy("fomaml", steps=1, lr=0.5).double().train()
    ep = {k: (v.double() if v.is_floating_point() else v) for k, v in episode(4).items()}
    logits = s.episode_logits(ep).logits
    torch.testing.assert_close(logits.detach(), fomaml_reference(s.model, ep, 0.5).detach())

    def outer_grad(query_logits: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(query_logits, ep["query_labels"])
        return torch.autograd.grad(loss, [s.model.proj.weight])[0]

    first, second = (
        outer_grad(fomaml_reference(s.model, ep, 0.5, second_order=so)) for so in (False, True)
    )
    assert (second - first).norm() > 1e-3 * first.norm()  # the dropped term is not negligible
    torch.testing.assert_close(outer_grad(logits), first)  # …and the strategy drops it


def test_fomaml_with_zero_steps_trains_like_protonet() -> None:
    ep = episode(5)
    grads = []
    for adaptation in ("none", "fomaml"):
        s = strategy(adaptation, steps=0).train()
        loss, _ = s.shared_step(ep, "train")
        grads.append(torch.autograd.grad(loss, [s.model.proj.weight])[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_validation_logs_accuracy_ci_and_raw_baseline() -> None:
    s = strategy().eval()
    logged = {}
    s.log_dict = lambda values, **_: logged.update(values)  # no trainer attached
    for seed in range(5):
        s.shared_step(episode(seed), "val")
    s._log_epoch("val")
    assert {"val/acc", "val/acc_ci95", "val/loss", "val/raw_proto_acc"} <= set(logged)
    assert 0.0 <= logged["val/acc"] <= 1.0 and logged["val/acc_ci95"] >= 0.0


def test_non_episodic_data_raises() -> None:
    spec = DataSpec(kind="classification", num_features=8, num_classes=10, task_names=("digits",))
    with pytest.raises(ValueError, match="strategy=fewshot needs episodic data"):
        FewShotStrategy(LinearEmbedder(), spec)
    with pytest.raises(ValueError, match="strategy.adaptation='maml'"):
        FewShotStrategy(LinearEmbedder(), SPEC, adaptation="maml")


def test_cli_error_on_plain_data(make_cfg) -> None:
    with pytest.raises(ConfigError, match="strategy=fewshot"):
        run(make_cfg(["data=digits", "strategy=fewshot", "debug=tiny"]))


def test_model_features_embed_the_episode() -> None:
    model = Model(SPEC, dim=16, depth=1, num_heads=2, feature_patch=4, heads="single")
    s = FewShotStrategy(model, SPEC)
    loss, out = s.shared_step(episode(), "train")
    assert out.logits.shape == (6, N_WAY) and torch.isfinite(loss)


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=fewshot_synthetic"],
        ["experiment=fewshot_synthetic", "data.k_shot=5", "strategy.adaptation=finetune_head"],
        [
            "experiment=fewshot_rotated_digits",
            "strategy.adaptation=fomaml",
            "strategy.adapt_steps=2",
        ],
    ],
)
def test_experiments_run(make_cfg, overrides: list[str]) -> None:
    metrics = run(make_cfg([*overrides, *SMALL_EPISODES, *FAST]))
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/acc_ci95"] >= 0.0
    assert 0.0 <= metrics["test/raw_proto_acc"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", fitting_models())
def test_every_fitting_model_trains_fewshot(make_cfg, name: str) -> None:
    overrides = [
        "data=fewshot_synthetic",
        "strategy=fewshot",
        f"model={name}",
        *SMALL_EPISODES,
        *FAST,
        *model_overrides(name),
    ]
    metrics = run(make_cfg(overrides))
    assert 0.0 <= metrics["test/acc"] <= 1.0
