"""Few-shot strategy: prototype math, CI, no query-label access, adaptation, runs."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader

from advarch.errors import ConfigError
from advarch.models import Model
from advarch.models.mmoe import MultiGateMoE
from advarch.models.output import ModelOutput
from advarch.spec import DataSpec
from advarch.strategies.fewshot import (
    FewShotStrategy,
    mean_ci95,
    prototype_logits,
    prototypes,
)
from advarch.train import run
from tests.conftest import final_module, first_batches
from tests.strategies.conftest import (
    FAST,
    fitting_models,
    model_overrides,
)
from tests.wandb_offline import history

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
    assert mean_ci95(torch.tensor([0.4]))[1] is None  # (one episode: no interval, not ±0)


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

    The head starts at the prototypes' (2c, −‖c‖²) and the inner step takes the support loss's
    partial derivatives in body and head as separate variables (Triantafillou et al. 2020: no
    inner gradient through the head's initialisation; the query logits reach it). First
    order: the inner gradients are constants (detached); `second_order=True` keeps their graph
    (double backward), the term first-order MAML drops.
    """
    w, b = model.proj.weight, model.proj.bias
    c = prototypes(ep["support"] @ w.T + b, ep["support_labels"], N_WAY)
    hw, hb = 2 * c, -(c**2).sum(-1)

    def support_loss(w, b, hw, hb) -> torch.Tensor:
        return F.cross_entropy((ep["support"] @ w.T + b) @ hw.T + hb, ep["support_labels"])

    grads = torch.func.grad(support_loss, argnums=(0, 1, 2, 3))(w, b, hw, hb)
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


def nearest_mean_accuracy(support, support_labels, query, query_labels) -> float:
    """Query accuracy of the nearest support class mean, by brute-force distances."""
    ways = range(int(support_labels.max()) + 1)
    means = torch.stack([support[support_labels == n].mean(0) for n in ways])
    predicted = torch.cdist(query.double(), means.double()).argmin(1)
    return (predicted == query_labels).double().mean().item()


def test_validation_logs_accuracy_ci_and_raw_baseline_to_wandb(tmp_path, monkeypatch) -> None:
    """A real Trainer validating 5 episodes with the offline W&B logger: the logged row holds
    the mean episode accuracy of the embedded and of the raw prototypes, with their 95% CI."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    episodes = [episode(seed) for seed in range(5)]
    s = strategy()
    logger = WandbLogger(save_dir=str(tmp_path), project="fewshot", offline=True)
    trainer = L.Trainer(logger=logger, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.validate(s, DataLoader(episodes, batch_size=None))
    logger.experiment.finish()
    (row,) = [r for r in history(tmp_path) if "val/acc" in r]

    def embedded(ep: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return s.model.proj(ep["support"]), ep["support_labels"], s.model.proj(ep["query"])

    for key, values in (
        ("acc", [nearest_mean_accuracy(*embedded(ep), ep["query_labels"]) for ep in episodes]),
        ("raw_proto_acc", [nearest_mean_accuracy(ep["support"], ep["support_labels"],
                                                 ep["query"], ep["query_labels"])
                           for ep in episodes]),
    ):  # fmt: skip
        assert np.std(values) > 0  # episodes differ: the CI is not trivially 0
        assert row[f"val/{key}"] == pytest.approx(np.mean(values), abs=1e-6), key
        ci = 1.96 * np.std(values, ddof=1) / math.sqrt(len(values))
        assert row[f"val/{key}_ci95"] == pytest.approx(ci, abs=1e-6), key


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


def checkpoint_accuracy(cfg, episodes: list[dict[str, torch.Tensor]]) -> float:
    """Mean ProtoNet query accuracy of the run's final checkpoint, from its model's features."""
    module = final_module(cfg)
    with torch.no_grad():
        return float(np.mean([
            nearest_mean_accuracy(module.embed(ep["support"]).features, ep["support_labels"],
                                  module.embed(ep["query"]).features, ep["query_labels"])
            for ep in episodes
        ]))  # fmt: skip


# 60 steps, 20 test episodes. Measured (seeds 0, 1, 2), test/acc vs test/raw_proto_acc:
#   synthetic 5-way 1-shot: 0.519 0.524 0.591 vs 0.255; 5-shot finetune_head: 0.805 0.832 0.840
#   vs 0.461 (the raw baseline does not depend on the seed: the episodes are data.seed's).
# Rotated digits with fomaml, 4 steps: 0.574 0.687 0.657 (chance 0.2; raw pixels 0.703).
EPISODES = ["data.val_episodes=4", "data.test_episodes=20", "data.episodes_per_epoch=20",
            "++trainer.limit_val_batches=2", "++trainer.limit_test_batches=20",
            "trainer.val_check_interval=20", "callbacks=none"]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "beats_raw_by"),
    [
        (["experiment=fewshot_synthetic", "trainer.max_steps=60"], 0.15),
        (["experiment=fewshot_synthetic", "data.k_shot=5", "strategy.adaptation=finetune_head",
          "trainer.max_steps=60"], 0.2),
        (["experiment=fewshot_rotated_digits", "strategy.adaptation=fomaml",
          "strategy.adapt_steps=2", "trainer.max_steps=4", "trainer.val_check_interval=4"], None),
    ],
)  # fmt: skip
def test_experiments_learn_and_report_the_raw_baseline(
    make_cfg, overrides: list[str], beats_raw_by: float | None
) -> None:
    """The learned metric beats raw-feature prototypes on the synthetic set (where it should:
    the class signal hides in 8 of 64 mixed dims) and chance by 2x on digits; the reported
    raw baseline is the nearest-class-mean accuracy of exactly the tested episodes."""
    cfg = make_cfg([*overrides, *EPISODES])
    metrics = run(cfg)
    episodes = first_batches(cfg, "test", 20)
    raw = [nearest_mean_accuracy(ep["support"], ep["support_labels"], ep["query"],
                                 ep["query_labels"]) for ep in episodes]  # fmt: skip
    assert metrics["test/raw_proto_acc"] == pytest.approx(np.mean(raw), abs=1e-6)
    if beats_raw_by is None:
        assert metrics["test/acc"] >= 2 / cfg.data.n_way
    else:
        assert metrics["test/acc"] >= metrics["test/raw_proto_acc"] + beats_raw_by
    if cfg.strategy.adaptation == "none":
        assert metrics["test/acc"] == pytest.approx(checkpoint_accuracy(cfg, episodes), abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", fitting_models())
def test_every_fitting_model_trains_fewshot(make_cfg, name: str) -> None:
    """Every model's pooled features are the embedding: the reported accuracy is that of the
    final checkpoint's features on the tested episodes."""
    overrides = [
        "data=fewshot_synthetic",
        "strategy=fewshot",
        f"model={name}",
        *SMALL_EPISODES,
        *FAST,
        *model_overrides(name),
    ]
    cfg = make_cfg(overrides)
    metrics = run(cfg)
    accuracy = checkpoint_accuracy(cfg, first_batches(cfg, "test", cfg.trainer.limit_test_batches))
    assert metrics["test/acc"] == pytest.approx(accuracy, abs=1e-6)


def small_fewshot(adaptation: str, compiled: bool = False, mmoe: bool = False
                  ) -> FewShotStrategy:  # fmt: skip
    """A 5-way 1-shot strategy on 64 features (episodes: `small_episodes`)."""
    extras = {"n_way": 5, "k_shot": 1, "n_query": 15}
    spec = DataSpec(kind="classification", num_features=64, num_classes=5,
                    task_names=("synthetic",), extras=extras)  # fmt: skip
    torch.manual_seed(0)
    model = MultiGateMoE(spec, num_experts=2) if mmoe else Model(
        spec, dim=32, depth=1, num_heads=2, layers=["attn"], ffn=["dense"], ffn_hidden=64,
        feature_patch=64)  # fmt: skip
    if compiled:
        model.compile()  # what model.compile=true does (advarch.pipeline.build_model)
    return FewShotStrategy(model, spec, adaptation=adaptation, adapt_steps=1, adapt_lr=0.01)


def small_episodes(count: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        {
            "support": torch.randn(5, 64, generator=gen),
            "support_labels": torch.arange(5),
            "query": torch.randn(5 * 15, 64, generator=gen),
            "query_labels": torch.arange(5).repeat(15),
        }
        for _ in range(count)
    ]


@pytest.mark.parametrize("mmoe", [False, True])
@pytest.mark.parametrize("adaptation", ["none", "fomaml"])
def test_every_trained_parameter_gets_a_gradient(adaptation: str, mmoe: bool) -> None:
    # DDP (trainer=ddp_sim) stopped at the first step ('parameters that were not used in
    # producing the loss'): the model's output layers, which the episode loss never reads
    fs = small_fewshot(adaptation, mmoe=mmoe)
    (episode,) = small_episodes(1)
    F.cross_entropy(fs.episode_logits(episode).logits, episode["query_labels"]).backward()
    assert [n for n, p in fs.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = [n for n, p in fs.model.named_parameters() if not p.requires_grad]
    assert frozen == (["tower_in", "tower_bias", "tower_out", "out_bias"] if mmoe else
                      ["head.weight", "head.bias"])  # (the summary counts them frozen)  # fmt: skip


@pytest.mark.slow
def test_fomaml_evaluates_a_compiled_model() -> None:
    """`model.compile=true strategy=fewshot strategy.adaptation=fomaml`: the inner loop's
    `autograd.grad(..., retain_graph=True)` meets Inductor's donated buffers in the graph
    compiled for evaluation, and the first validation stopped the run ('This backward function
    was compiled with non-empty donated buffers which requires ... retain_graph=False'). The
    compiled model must adapt and predict as the plain one does."""
    episodes = small_episodes(2)
    logits = []
    for compiled in (False, True):
        fs = small_fewshot("fomaml", compiled)
        fs.train()  # a training step, as the run takes before its first validation
        loss = F.cross_entropy(fs.episode_logits(episodes[0]).logits, episodes[0]["query_labels"])
        loss.backward()
        fs.eval()
        with torch.inference_mode():  # as Lightning validates
            logits.append(fs.episode_logits(episodes[1]).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_run_from_before_the_frozen_output_layers_resumes(make_cfg, tmp_path, monkeypatch
                                                            ) -> None:  # fmt: skip
    # review 36: a few-shot checkpoint written before the output layers were frozen holds an
    # optimizer over them too; resuming it (ckpt_path=auto after an upgrade, a requeued SLURM
    # job) stopped with torch's "loaded state dict contains a parameter group that doesn't
    # match the size of optimizer's group" and a traceback
    import advarch.strategies.fewshot as fewshot

    common = ["data=fewshot_synthetic", "strategy=fewshot", *SMALL_EPISODES, *FAST]
    with monkeypatch.context() as before:  # the code before: nothing frozen
        before.setattr(fewshot, "fnmatchcase", lambda name, glob: False)
        before_cfg = make_cfg([*common, "trainer.max_steps=2"], output_dir=tmp_path / "before")
        run(before_cfg)
    last = Path(before_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    resumed = make_cfg([*common, "trainer.max_steps=4", f"ckpt_path={last}"],
                       output_dir=tmp_path / "resumed")  # fmt: skip
    run(resumed)


@pytest.mark.parametrize("mmoe", [False, True])
def test_the_checkpoints_parameter_counts_are_the_summarys(mmoe: bool) -> None:
    # review 36: BaseStrategy records `count_parameters(model)` in hparams (the checkpoint's
    # hyper_parameters) before few-shot freezes the output layers: it says 0 frozen while
    # the model summary says the head is (finetune updates its hparams after its plan)
    fs = small_fewshot("none", mmoe=mmoe)
    saved = {k: v for k, v in fs.hparams.items() if k.startswith("params/")}
    assert saved == fs.parameter_counts()
