"""Fisher estimators against plain per-sample loops (float64), and the vmap fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advarch.models.model import Model
from advarch.spec import DataSpec
from advarch.strategies.fisher import FisherEstimator, take_samples
from advarch.strategies.objectives import model_inputs, select_task_logits

SPEC = DataSpec(
    kind="classification",
    num_features=16,
    num_classes=5,
    task_names=("t0", "t1"),
    extras={"scenario": "task"},
)


def log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs, kwargs = model_inputs(batch)
    logits = select_task_logits(model(inputs, **kwargs).logits, batch["task"])
    return logits.log_softmax(-1)


def make_model(seed: int = 0, **kwargs) -> Model:
    torch.manual_seed(seed)
    options = dict(dim=8, depth=1, num_heads=2, ffn_hidden=16, feature_patch=4)
    return Model(SPEC, **(options | kwargs)).double()


def make_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "inputs": torch.rand(n, 16, generator=g, dtype=torch.float64),
        "labels": torch.randint(0, 5, (n,), generator=g),
        "task": torch.randint(0, 2, (n,), generator=g),
    }


def grads_of(model: nn.Module, scalar: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    live = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(scalar, live, retain_graph=True, allow_unused=True)
    return {
        n: torch.zeros_like(p) if g is None else g
        for n, p, g in zip(names, live, grads, strict=True)
    }


def fisher_reference(model: nn.Module, batch: dict, targets: torch.Tensor | None) -> dict:
    """1/n Σ_i g_i² with g_i = ∇ log p(y_i|x_i); targets None = Σ_c p(c|x_i) g_ic²."""
    model.eval()
    n = len(batch["labels"])
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for i in range(n):
        lp = log_probs(model, {k: v[i : i + 1] for k, v in batch.items()})[0]
        classes = range(lp.shape[0]) if targets is None else [int(targets[i])]
        for c in classes:
            weight = lp[c].exp().item() if targets is None else 1.0
            for k, g in grads_of(model, lp[c]).items():
                total[k] += weight * g**2
    return {k: v / n for k, v in total.items()}


def assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=k)


@pytest.mark.parametrize("estimator", ["empirical", "exact"])
@pytest.mark.parametrize("vectorized", [None, False])
def test_per_sample_estimators_match_loop_reference(
    estimator: str, vectorized: bool | None
) -> None:
    model, batch = make_model(), make_batch(7)
    est = FisherEstimator(estimator, num_samples=7, chunk_size=3)
    est.vectorized = vectorized  # None: detect (vmap works here); False: the fallback loop
    got = est(model, [batch], log_probs)
    assert est.vectorized is (vectorized is None)
    targets = batch["labels"] if estimator == "empirical" else None
    assert_close(got, fisher_reference(model, batch, targets))


def test_sampled_uses_labels_drawn_from_the_model() -> None:
    model, batch = make_model(), make_batch(6)
    got = FisherEstimator("sampled", num_samples=6, chunk_size=6, seed=3)(model, [batch], log_probs)
    with torch.no_grad():
        probs = log_probs(model.eval(), batch).exp()
    drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3))[:, 0]
    assert_close(got, fisher_reference(model, batch, drawn))


def test_sampled_draws_depend_on_the_call_seed_only() -> None:
    # a resumed run skips the calls of earlier tasks: its next Fisher must not differ
    model, batch = make_model(), make_batch(6)
    est = FisherEstimator("sampled", num_samples=6, chunk_size=6)
    first, again = est(model, [batch], log_probs, seed=5), est(model, [batch], log_probs, seed=5)
    fresh = FisherEstimator("sampled", num_samples=6, chunk_size=6)(model, [batch], log_probs,
                                                                    seed=5)  # fmt: skip
    for name in first:
        assert torch.equal(first[name], again[name]) and torch.equal(first[name], fresh[name])


def test_per_sample_differs_from_batched_on_two_samples() -> None:
    model, batch = make_model(), make_batch(2)
    per_sample = FisherEstimator("empirical", num_samples=2, chunk_size=2)(
        model, [batch], log_probs
    )
    batched = FisherEstimator("batched", num_samples=2, chunk_size=2)(model, [batch], log_probs)
    model.eval()
    g = [
        grads_of(
            model,
            log_probs(model, {k: v[i : i + 1] for k, v in batch.items()})[0, batch["labels"][i]],
        )
        for i in range(2)
    ]
    for k in per_sample:
        torch.testing.assert_close(per_sample[k], (g[0][k] ** 2 + g[1][k] ** 2) / 2)
        torch.testing.assert_close(batched[k], ((g[0][k] + g[1][k]) / 2) ** 2)
    w = "layers.0.ffn.w_in.weight" if "layers.0.ffn.w_in.weight" in per_sample else "head.weight"
    assert not torch.allclose(per_sample[w], batched[w])  # cross terms do not vanish


def test_per_task_head_only_own_rows_get_importance() -> None:
    model, batch = make_model(), make_batch(5)
    batch["task"].fill_(1)
    fisher = FisherEstimator("empirical", num_samples=5)(model, [batch], log_probs)
    head = fisher["head.weight"].view(2, 5, -1)  # (tasks, C, D)
    assert head[0].abs().max() == 0 and head[1].abs().max() > 0


def test_moe_model_falls_back_to_loop_and_matches_reference(caplog) -> None:
    model = make_model(ffn=["moe"], moe={"num_experts": 4, "top_k": 2})
    batch = make_batch(4)
    est = FisherEstimator("empirical", num_samples=4, chunk_size=4)
    with caplog.at_level("DEBUG", logger="advarch"):
        got = est(model, [batch], log_probs)
    assert est.vectorized is False  # data-dependent dispatch cannot be vmapped
    (record,) = [r for r in caplog.records if "Fisher" in r.getMessage()]  # one line, and no
    assert record.levelname == "DEBUG" and "the same Fisher" in record.getMessage()  # console
    assert model.training  # eval only while estimating
    assert_close(got, fisher_reference(model, batch, batch["labels"]))


@pytest.mark.parametrize("vectorized", [None, False])
def test_a_language_models_padding_takes_no_part_in_its_fisher(vectorized) -> None:
    # review 42: a sequence's log-likelihood counted its padding (and -100 targets failed);
    # padded after position 5, a causal LM's sequence has the Fisher of its first 5 tokens
    spec = DataSpec(kind="lm", vocab_size=11, seq_len=8)
    torch.manual_seed(0)
    model = Model(spec, dim=8, depth=1, num_heads=2, ffn_hidden=16).double()

    def lm_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["input_ids"]).logits.log_softmax(-1)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (3, 8), generator=g)
    labels = torch.randint(0, 11, (3, 8), generator=g)
    padded = {"input_ids": ids, "labels": labels.masked_fill(torch.arange(8) >= 5, -100)}
    cut = {"input_ids": ids[:, :5], "labels": labels[:, :5]}
    fishers = []
    for batch in (padded, cut):
        estimator = FisherEstimator("empirical", num_samples=3)
        estimator.vectorized = vectorized
        fishers.append(estimator(model, [batch], lm_log_probs))
    assert_close(*fishers)


def test_take_samples_rechunks_and_caps() -> None:
    batches = [make_batch(5, seed=s) for s in range(3)]
    chunks = list(take_samples(batches, num_samples=12, chunk_size=4))
    assert [len(c["labels"]) for c in chunks] == [4, 4, 4]
    assert torch.equal(chunks[1]["inputs"][1], batches[1]["inputs"][0])
    assert sum(len(c["labels"]) for c in take_samples(batches, 99, 4)) == 15


def test_bad_estimator_names_the_key() -> None:
    with pytest.raises(ValueError, match="strategy.fisher_estimator='diag'"):
        FisherEstimator("diag")


def _receive(estimator: FisherEstimator, seen: object) -> None:
    seen.put(estimator.estimator)


def test_the_estimator_crosses_into_a_spawned_process() -> None:
    # ddp_spawn sends the strategy to its workers: a torch.Generator it held failed to unpickle
    # there ("unable to resize file"), and `trainer=ddp_sim strategy=ewc` hung
    import torch.multiprocessing as mp

    estimator = FisherEstimator("sampled")
    model = nn.Linear(3, 2)
    batch = {"inputs": torch.randn(4, 3), "labels": torch.tensor([0, 1, 0, 1])}
    estimator(model, [batch], lambda m, b: m(b["inputs"]).log_softmax(-1))  # (used once)
    context = mp.get_context("spawn")
    seen = context.SimpleQueue()
    worker = context.Process(target=_receive, args=(estimator, seen))
    worker.start()
    worker.join(60)
    assert worker.exitcode == 0 and seen.get() == "sampled"
