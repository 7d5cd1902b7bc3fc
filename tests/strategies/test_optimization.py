"""Optimizer and scheduler factories: today's LR curve kept bit for bit, options that change it."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from advarch.checkpoint import saved_config
from advarch.config.combinations import with_default_model, with_default_optimization
from advarch.pipeline import build_optimization
from advarch.strategies.optimization import constant, cosine, linear, parameter_groups
from tests.cli import read_metrics, series
from tests.conftest import SMALL_TEXT
from tests.test_configs import trained_run


def old_warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """BaseStrategy's multiplier before the scheduler became a config group (the reference)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def curve(make_scheduler, total: int, lr: float = 2e-3) -> list[float]:
    """The LR of every step (and one past the end) as the strategy's scheduler sets it."""
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=lr)
    scheduler = make_scheduler(opt, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize(
    ("warmup", "total", "min_lr_ratio"),
    [(50, 6, 0.1), (50, 1000, 0.1), (20, 150, 0.1), (100, 6500, 0.0), (20, 300, 1.0), (0, 7, 0.3)],
)
def test_cosine_is_the_old_warmup_cosine_bit_for_bit(warmup, total, min_lr_ratio) -> None:
    lr = 2e-3
    capped = min(warmup, total // 10)  # the old configure_optimizers' cap
    expected = [lr * old_warmup_cosine(s, capped, total, min_lr_ratio) for s in range(total + 1)]
    got = curve(partial(cosine, warmup_steps=warmup, min_lr_ratio=min_lr_ratio), total, lr)
    assert got == expected


def test_linear_and_constant_curves() -> None:
    # 100 steps: warm-up capped at 10 → 0.1, 0.2 … 1.0, then the decay
    lin = curve(partial(linear, warmup_steps=50, min_lr_ratio=0.2), 100, lr=1.0)
    assert lin[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lin[10] == 1.0 and lin[55] == pytest.approx(0.6) and lin[100] == pytest.approx(0.2)
    const = curve(partial(constant, warmup_steps=4), 100, lr=1.0)
    assert const[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and set(const[4:]) == {1.0}


def test_bad_schedule_values_name_the_key() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match=r"scheduler\.warmup_steps=-1"):
        cosine(opt, 10, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"scheduler\.min_lr_ratio=1\.5"):
        linear(opt, 10, min_lr_ratio=1.5)


def test_no_weight_decay_on_norms_biases_embeddings_or_frozen() -> None:
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[3].weight.requires_grad_(False)
    decay, rest = parameter_groups(model)
    assert [p.shape for p in decay["params"]] == [(4, 4)] and "weight_decay" not in decay
    assert rest["weight_decay"] == 0.0
    assert {id(p) for p in rest["params"]} == {
        id(p) for p in (model[0].weight, model[1].bias, model[2].weight, model[2].bias)
    } | {id(model[3].bias)}


def test_no_weight_decay_on_stacked_biases_or_ssm_decays() -> None:
    # 2-d, yet a bias or A_log (decay would pull every A towards -1); learned feature
    # positions are decayed, as GPT-2's
    from advarch.models.mmoe import MultiGateMoE
    from advarch.models.model import Model
    from advarch.spec import DataSpec

    ssm = Model(DataSpec(kind="lm", vocab_size=16, seq_len=8), dim=16, depth=1, layers="ssm")
    mmoe = MultiGateMoE(DataSpec(kind="classification", num_features=8, num_classes=2,
                                 task_names=("a", "b")))  # fmt: skip
    for model, kept in [(ssm, ["A_log"]), (mmoe, ["expert_bias", "tower_bias", "out_bias"])]:
        decay, _ = parameter_groups(model)
        decayed = {id(p) for p in decay["params"]}
        names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if id(p) in decayed}
        assert names and not names & {*kept, "bias"}, names


@pytest.mark.parametrize(
    ("overrides", "added"),
    [
        (["strategy=fewshot"], ["optimizer.lr=0.001", "optimizer.weight_decay=0.01"]),
        (["strategy=finetune"], ["scheduler.warmup_steps=20"]),
        (["strategy=retrofit"], ["optimizer.lr=0.003", "scheduler.warmup_steps=20"]),
        (["strategy=retrofit", "optimizer=sgd"], ["scheduler.warmup_steps=20"]),  # user's group
        (["strategy=fewshot", "optimizer.lr=0.01"], ["optimizer.weight_decay=0.01"]),
        (["strategy=finetune", "experiment=merge_digit_tasks"], []),  # experiments pin their own
        (["-m", "strategy=finetune,retrofit"], []),  # a sweep over different defaults
        (["strategy=ewc"], []),
    ],
)
def test_strategy_optimization_defaults(overrides: list[str], added: list[str]) -> None:
    assert with_default_optimization(overrides) == [*overrides, *added]


@pytest.mark.parametrize(
    ("overrides", "added"),
    [
        (["strategy=fewshot"], ["model.feature_patch=64"]),  # the default model, moe
        (["strategy=fewshot", "model=ssm,transformer"], ["model.feature_patch=64"]),
        (["strategy=fewshot", "model=mmoe"], []),  # no such key: its own inputs
        (["strategy=fewshot", "model.feature_patch=8"], []),  # the user's
        (["strategy=fewshot", "experiment=fewshot_synthetic"], []),
        (["--config-dir", "mine", "strategy=fewshot", "model=own"], []),  # a model of theirs
        (["strategy=ewc"], []),
    ],
)
def test_strategy_model_defaults(overrides: list[str], added: list[str]) -> None:
    assert with_default_model(overrides) == [*overrides, *added]


@pytest.mark.parametrize(
    ("overrides", "column", "multiplier"),
    [
        (
            ["optimizer=sgd", "optimizer.lr=0.05", "scheduler=linear"],
            "lr-SGD",
            lambda s: 1.0 if s < 1 else 1 - (s - 1) / 9,
        ),
        (["optimizer=adam", "optimizer.lr=0.05", "scheduler=constant"], "lr-Adam", lambda s: 1.0),
        (  # once per optimizer step, not per micro-batch (it logged each step's rows twice)
            [
                "optimizer=adam",
                "optimizer.lr=0.05",
                "scheduler=constant",
                "trainer.accumulate_grad_batches=2",
            ],
            "lr-Adam",
            lambda s: 1.0,
        ),  # fmt: skip
    ],
)
def test_optimizer_and_scheduler_options_change_the_run(
    make_cfg, overrides, column, multiplier
) -> None:
    """The logged LR (Lightning's LearningRateMonitor names the optimizer class) follows the
    chosen schedule; warm-up 5 is capped at a tenth of the 10 steps."""
    steps = ["trainer.max_steps=10", "scheduler.warmup_steps=5"]
    _, out = trained_run(make_cfg, ["debug=tiny", *SMALL_TEXT, *overrides, *steps])
    rows = read_metrics(out)
    assert not any(k.startswith("lr-AdamW") for r in rows for k in r)
    for group in ("pg1", "pg2"):
        lrs = series(rows, f"{column}/{group}")
        assert lrs == pytest.approx([0.05 * multiplier(s) for s in range(10)])


def test_a_checkpoint_from_before_the_groups_rebuilds_its_optimization() -> None:
    old = {"_target_": "advarch.strategies.plain.PlainStrategy", "aux_loss_weight": 1.0}
    old |= {"lr": 3e-3, "weight_decay": 0.0, "betas": [0.9, 0.95]}
    old |= {"warmup_steps": 20, "min_lr_ratio": 1.0}
    cfg = saved_config({"hyper_parameters": {"cfg": {"strategy": old, "seed": 1}}}, "old.ckpt")
    assert dict(cfg.strategy) == {"_target_": old["_target_"], "aux_loss_weight": 1.0}
    factories = build_optimization(cfg)
    opt = factories["optimizer"]([nn.Parameter(torch.zeros(2, 2))])
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 3e-3
    assert curve(factories["scheduler"], 200, lr=1.0)[20:] == [1.0] * 181
