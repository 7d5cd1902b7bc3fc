"""Multi-task strategy and the MMoE / one-gate MoE / shared-bottom models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from advarch.errors import ConfigError
from advarch.models.mmoe import MultiGateMoE
from advarch.spec import DataSpec
from advarch.strategies.multitask import MultiTaskStrategy, balanced_task_loss, gate_cosine
from advarch.train import run
from tests.conftest import final_module, first_batches
from tests.strategies.conftest import (
    FAST,
    fitting_models,
    model_overrides,
)

SPEC = DataSpec(kind="regression", num_features=12, num_classes=1, task_names=("task_a", "task_b"))
SMALL_MMOE = [
    "data.num_samples=600",
    "data.val_samples=100",
    "data.test_samples=100",
    "data.batch_size=32",
    "data.num_features=64",
]


def mmoe_reference(model: MultiGateMoE, x: torch.Tensor) -> torch.Tensor:
    """Loop version of Ma et al. eq. 6-8: per expert, per task, one tower at a time → (B, K)."""
    experts = [
        F.relu(x @ model.expert_in[e] + model.expert_bias[e])
        for e in range(model.expert_in.shape[0])
    ]  # E × (B, H)
    outputs = []
    for k in range(model.num_heads_out):
        if model.gate is None:
            mixed = experts[0]
        else:
            g = (x @ model.gate[k if model.gate.shape[0] > 1 else 0]).softmax(-1)  # (B, E)
            mixed = sum(g[:, e : e + 1] * h for e, h in enumerate(experts))
        u = F.relu(mixed @ model.tower_in[k] + model.tower_bias[k])
        outputs.append(u @ model.tower_out[k] + model.out_bias[k])  # (B, 1)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("gating", ["per_task", "shared", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mmoe_matches_reference_outputs_and_gradients(gating: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = MultiGateMoE(
        SPEC,
        num_experts=1 if gating == "none" else 4,
        expert_hidden=6,
        tower_hidden=5,
        gating=gating,
    ).double()
    x = torch.randn(7, 12, dtype=torch.float64)
    fast, ref = model(x).logits, mmoe_reference(model, x)
    torch.testing.assert_close(fast, ref)
    g_fast = torch.autograd.grad(fast.square().sum(), list(model.parameters()))
    g_ref = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_mmoe_with_one_task_equals_one_gate_moe() -> None:
    spec = DataSpec(kind="regression", num_features=12, num_classes=1, task_names=("only",))
    torch.manual_seed(0)
    mmoe = MultiGateMoE(spec, num_experts=4, gating="per_task")
    omoe = MultiGateMoE(spec, num_experts=4, gating="shared")
    omoe.load_state_dict(mmoe.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(mmoe(x).logits, omoe(x).logits)


def test_gates_are_distributions_and_shared_bottom_has_none() -> None:
    torch.manual_seed(0)
    model = MultiGateMoE(SPEC, num_experts=5)
    x = torch.randn(9, 12)
    gates = model.gates(x)  # (B, K, E)
    assert gates.shape == (9, 2, 5)
    torch.testing.assert_close(gates.sum(-1), torch.ones(9, 2))
    out = model(x)
    assert set(out.stats) == {"gate/task_0", "gate/task_1"}
    torch.testing.assert_close(out.stats["gate/task_1"], gates[:, 1].mean(0))
    bottom = MultiGateMoE(SPEC, num_experts=1, gating="none")
    assert bottom.gate is None and bottom.gates(x) is None and bottom(x).stats == {}


def test_mmoe_classification_shapes_and_features() -> None:
    spec = DataSpec(kind="classification", num_features=12, num_classes=3, task_names=("a", "b"))
    out = MultiGateMoE(spec, num_experts=4, expert_hidden=6)(torch.randn(4, 12))
    assert out.logits.shape == (4, 2, 3) and out.features.shape == (4, 12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gating": "none"}, "model.gating=none"),
        ({"gating": "mixed"}, "model.gating='mixed'"),
        ({"num_experts": 0}, "model.num_experts=0"),
        ({"dropout": 1.0}, "model.dropout=1.0"),
    ],
)
def test_mmoe_invalid_args_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        MultiGateMoE(SPEC, **kwargs)


def test_gate_cosine_hand_values() -> None:
    assert gate_cosine(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(0.0)
    assert gate_cosine(torch.tensor([[0.6, 0.8], [0.8, 0.6]])).item() == pytest.approx(0.96)
    # three tasks: mean over the pairs (1, 0.96, 0.96) ... computed by hand below
    g = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.6, 0.8]])
    assert gate_cosine(g).item() == pytest.approx((0.96 + 1.0 + 0.96) / 3)
    assert gate_cosine(torch.tensor([[0.2, 0.8]])).item() == pytest.approx(1.0)


def balanced_task_loss_reference(
    losses: list[float], tasks: list[int], weights: list[float]
) -> float:
    per_task = {}
    for loss, t in zip(losses, tasks, strict=True):
        per_task.setdefault(t, []).append(loss)
    means = {t: sum(v) / len(v) for t, v in per_task.items()}
    return sum(weights[t] * m for t, m in means.items()) / sum(weights[t] for t in means)


@pytest.mark.parametrize("seed", range(4))
def test_balanced_task_loss_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, k = 11, 3
    losses = torch.rand(n, generator=g, dtype=torch.float64, requires_grad=True)
    tasks = torch.randint(0, k - (seed % 2), (n,), generator=g)  # odd seeds leave a task out
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    loss, per_task, present = balanced_task_loss(losses, tasks, weights)
    expected = balanced_task_loss_reference(losses.tolist(), tasks.tolist(), weights.tolist())
    assert loss.item() == pytest.approx(expected)
    assert present.tolist() == [(tasks == t).any().item() for t in range(k)]
    # gradient: example i of task t gets w_t / (n_t · Σ_present w)
    (grad,) = torch.autograd.grad(loss, losses)
    counts = torch.bincount(tasks, minlength=k).double()
    expected_grad = weights[tasks] / counts[tasks] / weights[present].sum()
    torch.testing.assert_close(grad, expected_grad)


def test_balanced_loss_ignores_task_frequency() -> None:
    """Nine examples of task 0 and one of task 1 count equally with equal weights."""
    losses = torch.tensor([1.0] * 9 + [5.0])
    tasks = torch.tensor([0] * 9 + [1])
    loss, _, _ = balanced_task_loss(losses, tasks, torch.ones(2))
    assert loss.item() == pytest.approx(3.0)  # not the example mean 1.4


def test_a_batch_of_zero_weight_tasks_only_has_a_finite_zero_loss() -> None:
    # strategy.task_weights accepts a zero weight (non-negative, positive sum); a classification
    # batch whose examples all belong to zero-weight tasks then divided 0 by Σ_present w = 0:
    # a NaN loss (training stops with "training loss is nan", validation's loss turns NaN).
    # Such a batch weighs nothing: its loss is 0 and it sends no gradient.
    losses = torch.tensor([0.7, 1.3, 0.2], requires_grad=True)
    tasks = torch.tensor([1, 1, 1])
    loss, per_task, present = balanced_task_loss(losses, tasks, torch.tensor([1.0, 0.0]))
    assert present.tolist() == [False, True]
    assert torch.isfinite(loss) and loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, losses)
    assert torch.equal(grad, torch.zeros(3))


def test_strategy_loss_applies_task_weights_and_logs_per_task() -> None:
    torch.manual_seed(0)
    model = MultiGateMoE(SPEC, num_experts=4)
    strategy = MultiTaskStrategy(model, SPEC, task_weights=[1.0, 3.0])
    batch = {"inputs": torch.randn(8, 12), "targets": torch.randn(8, 2)}
    loss, out = strategy.shared_step(batch, "val")
    mse = (out.logits - batch["targets"]).pow(2).mean(0)  # (K,)
    assert loss.item() == pytest.approx(((mse[0] + 3 * mse[1]) / 4).item(), rel=1e-5)
    m = strategy.task_metrics["val_task_b"]
    assert m["score"].compute().item() == pytest.approx(mse[1].item(), rel=1e-5)
    assert strategy._epoch_gates("val").shape == (2, 4)  # (tasks, experts)


def test_classification_batches_use_each_examples_task_head() -> None:
    spec = DataSpec(kind="classification", num_features=12, num_classes=3, task_names=("a", "b"))
    torch.manual_seed(0)
    strategy = MultiTaskStrategy(MultiGateMoE(spec, num_experts=2), spec)
    batch = {
        "inputs": torch.randn(6, 12),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2]),
        "task": torch.tensor([0, 0, 0, 0, 0, 1]),
    }
    loss, out = strategy.shared_step(batch, "train")
    ce = F.cross_entropy(
        out.logits[torch.arange(6), batch["task"]], batch["labels"], reduction="none"
    )
    assert loss.item() == pytest.approx(((ce[:5].mean() + ce[5]) / 2).item(), rel=1e-5)


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        (
            DataSpec(kind="classification", num_features=12, num_classes=10),
            {},
            "strategy=multitask needs data with >= 2 tasks",
        ),
        (
            DataSpec(
                kind="classification",
                num_features=12,
                num_classes=10,
                task_names=("a", "b"),
                extras={"epochs_per_task": 1, "scenario": "task"},
            ),
            {},
            "continual stream",
        ),
        (SPEC, {"task_weights": [1.0]}, "strategy.task_weights"),
        (SPEC, {"task_weights": [-1.0, 1.0]}, "strategy.task_weights"),
    ],
)
def test_impossible_combinations_raise(spec: DataSpec, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MultiTaskStrategy(torch.nn.Linear(1, 1), spec, **kwargs)


def test_single_head_model_is_rejected() -> None:
    from advarch.models import Model

    model = Model(SPEC, dim=16, depth=1, num_heads=2, feature_patch=4, heads="single")
    with pytest.raises(ValueError, match="model.heads=per_task"):
        MultiTaskStrategy(model, SPEC)


def test_cli_error_on_single_task_data(make_cfg) -> None:
    cfg = make_cfg(["data=digits", "strategy=multitask", "debug=tiny"])
    with pytest.raises(ConfigError, match="strategy=multitask"):
        run(cfg)


# 300 steps of batch 64 on 4000 rows: per-task test MSE, seeds 0-2, against the test labels'
# variance (1.36, 0.98): task_a 0.375 0.224 0.234, task_b 0.246 0.130 0.178.
LEARNING_MMOE = ["data.num_samples=4200", "data.val_samples=100", "data.test_samples=100",
                 "data.batch_size=64", "data.num_features=64", "trainer.max_steps=300",
                 "trainer.val_check_interval=100", "callbacks=none"]  # fmt: skip


def test_mmoe_synthetic_experiment_learns_both_tasks(make_cfg) -> None:
    """Each task's tower predicts its own labels: test MSE below half the labels' variance
    (a constant predictor's MSE), so neither task is starved or given the other's targets."""
    cfg = make_cfg(["experiment=mmoe_synthetic", *LEARNING_MMOE])
    metrics = run(cfg)
    targets = torch.cat([b["targets"] for b in first_batches(cfg, "test", 100)])  # (N, 2)
    for k, name in enumerate(("task_a", "task_b")):
        assert metrics[f"test/{name}/mse"] < 0.5 * targets[:, k].var(correction=0).item(), name
    assert 0.0 < metrics["test/gate_cosine"] <= 1.0 + 1e-6
    usage = [metrics[f"test/task_a/expert{e}"] for e in range(8)]
    assert sum(usage) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", fitting_models())
def test_every_fitting_model_trains_multitask(make_cfg, name: str) -> None:
    """Every model serves one output per task: each reported per-task test MSE is that of the
    final checkpoint's matching output on the tested batches."""
    overrides = [
        "data=mmoe_synthetic",
        "strategy=multitask",
        f"model={name}",
        *SMALL_MMOE,
        *FAST,
        *model_overrides(name),
    ]
    cfg = make_cfg(overrides)
    metrics = run(cfg)
    module = final_module(cfg)
    batches = first_batches(cfg, "test", cfg.trainer.limit_test_batches)
    with torch.no_grad():
        preds = torch.cat([module(b).logits for b in batches])  # (N, 2)
    targets = torch.cat([b["targets"] for b in batches])
    for k, name in enumerate(("task_a", "task_b")):
        mse = F.mse_loss(preds[:, k], targets[:, k]).item()
        assert metrics[f"test/{name}/mse"] == pytest.approx(mse, rel=1e-5), name


def test_epoch_gate_usage_weights_every_example_equally() -> None:
    """`<split>/<task>/expert{e}` is the task's gate averaged over the epoch's examples (and
    the cosine is of those averages). Batches of different sizes (a short last batch) must
    count by their examples, as every other epoch metric does (`WeightedMean`): the mean of
    per-batch means over-weights the short batch."""
    torch.manual_seed(0)
    model = MultiGateMoE(SPEC, num_experts=4).eval()
    strategy = MultiTaskStrategy(model, SPEC).eval()
    x, y = torch.randn(6, 12) * 3, torch.randn(6, 2)
    logged: dict[str, float] = {}
    strategy.log_dict = lambda values, *a, **k: logged.update(  # type: ignore[method-assign]
        {n: float(v) for n, v in values.items()}
    )
    with torch.no_grad():
        whole = model(x).stats  # the batch-mean gates of all 6 examples at once
        for rows in (slice(0, 5), slice(5, 6)):  # a batch of 5, then a short one of 1
            strategy.shared_step({"inputs": x[rows], "targets": y[rows]}, "val")
    strategy._log_epoch("val")
    for k, task in enumerate(SPEC.task_names):
        for e in range(4):
            want = float(whole[f"gate/task_{k}"][e])
            assert logged[f"val/{task}/expert{e}"] == pytest.approx(want, rel=1e-5)
