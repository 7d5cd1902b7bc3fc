"""Tests of few-shot episodes, the synthetic many-class set and the raw-prototype baseline."""

from __future__ import annotations

import re
from collections.abc import Iterable
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from advarch.data.episodes import EpisodeSampler, FewShotDataModule, split_class_sizes
from advarch.strategies.fewshot import raw_prototype_accuracy as prototype_accuracy


def prototype_accuracy_reference(episode: dict[str, torch.Tensor]) -> float:
    """Loop version: nearest class mean by squared Euclidean distance, query by query."""
    support, labels = episode["support"].double(), episode["support_labels"].tolist()
    classes = sorted(set(labels))
    means = {c: support[[i for i, s in enumerate(labels) if s == c]].mean(0) for c in classes}
    correct = 0
    for x, y in zip(episode["query"].double(), episode["query_labels"].tolist(), strict=True):
        distances = {c: float(((x - m) ** 2).sum()) for c, m in means.items()}
        correct += min(distances, key=distances.get) == y
    return correct / len(episode["query_labels"])


def raw_prototype_accuracy(episodes: Iterable[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """The raw-feature ProtoNet baseline (`strategy=fewshot` logs it as `raw_proto_acc`): mean
    accuracy over episodes and its 95% CI half-width.

    `ci95 = 1.96 * std / sqrt(n)` with the unbiased std over episodes (0 for one episode).
    """
    accuracies = np.array([float(prototype_accuracy(e)) for e in episodes])
    if len(accuracies) < 2:
        return float(accuracies.mean()), 0.0
    return float(accuracies.mean()), float(1.96 * accuracies.std(ddof=1) / np.sqrt(len(accuracies)))


@pytest.fixture(scope="module")
def rotated() -> FewShotDataModule:
    dm = FewShotDataModule(source="rotated_digits", n_way=5, k_shot=2, n_query=3, seed=1)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def synthetic() -> FewShotDataModule:
    dm = FewShotDataModule(source="synthetic", test_episodes=200)
    dm.setup()
    return dm


@pytest.mark.parametrize("input_format", ["features", "tokens"])
def test_episode_shapes_and_spec(input_format):
    dm = FewShotDataModule(n_way=4, k_shot=3, n_query=5, input_format=input_format)
    dm.setup()
    episode = next(iter(dm.train_dataloader()))
    width = dm.spec.num_features or dm.spec.seq_len
    assert episode["support"].shape == (12, width) and episode["query"].shape == (20, width)
    assert episode["support_labels"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert sorted(episode["query_labels"].tolist()) == sorted(list(range(4)) * 5)
    dtype = torch.float32 if input_format == "features" else torch.long
    assert episode["support"].dtype == dtype
    assert dm.spec.num_classes == 4 and dm.spec.extras["k_shot"] == 3


def test_rotated_splits_are_class_and_digit_disjoint(rotated):
    classes = {s: set(rotated.samplers[s].class_ids.tolist()) for s in ("train", "val", "test")}
    assert [len(c) for c in classes.values()] == [24, 8, 8]
    assert not (classes["train"] & classes["val"] or classes["train"] & classes["test"])
    assert not classes["val"] & classes["test"]
    digits = {s: {c % 10 for c in cs} for s, cs in classes.items()}
    assert digits == {"train": set(range(6)), "val": {6, 7}, "test": {8, 9}}


def test_synthetic_splits_are_class_disjoint(synthetic):
    classes = [set(synthetic.samplers[s].class_ids.tolist()) for s in ("train", "val", "test")]
    assert [len(c) for c in classes] == [120, 40, 40]
    assert set().union(*classes) == set(range(200)) and sum(map(len, classes)) == 200


def test_episode_contents_match_their_classes(rotated):
    sampler = rotated.samplers["train"]
    pool_classes = rotated.data["train"][:]["classes"].numpy()
    for index in range(30):
        plan = sampler.episode(index)
        support, query = plan["support"], plan["query"]
        assert not set(support) & set(query) and len(set(query)) == len(query)
        assert np.array_equal(pool_classes[support], plan["classes"][plan["support_labels"]])
        assert np.array_equal(pool_classes[query], plan["classes"][plan["query_labels"]])


def test_episode_labels_are_not_assigned_in_sorted_class_order(rotated):
    orders = [rotated.samplers["train"].episode(i)["classes"] for i in range(50)]
    ascending = [np.all(np.diff(o) > 0) for o in orders]
    assert not all(ascending)
    label0_classes = {int(o[0]) for o in orders}  # label 0 goes to many different classes
    assert len(label0_classes) > 10


def test_test_episodes_are_fixed_and_train_episodes_change(rotated):
    first = list(rotated.test_dataloader())
    second = list(rotated.test_dataloader())
    assert len(first) == 600
    assert all(torch.equal(a["query"], b["query"]) for a, b in zip(first, second, strict=True))
    loader = rotated.train_dataloader()
    epoch0, epoch1 = next(iter(loader)), next(iter(loader))
    assert not torch.equal(epoch0["support"], epoch1["support"])
    rotated.trainer = SimpleNamespace(current_epoch=0)  # a stand-in trainer, epoch 0 again
    try:
        assert torch.equal(next(iter(rotated.train_dataloader()))["support"], epoch0["support"])
    finally:
        rotated.trainer = None


@pytest.mark.parametrize("seed", range(3))
def test_prototype_accuracy_matches_reference(seed):
    sampler = EpisodeSampler(np.repeat(np.arange(7), 9), n_way=5, k_shot=3, n_query=4, seed=seed)
    inputs = torch.from_numpy(np.random.default_rng(seed).normal(size=(63, 6)))
    plan = {k: torch.from_numpy(v) for k, v in sampler.episode(0).items()}
    episode = {**plan, "support": inputs[plan["support"]], "query": inputs[plan["query"]]}
    expected = prototype_accuracy_reference(episode)
    assert float(prototype_accuracy(episode)) == pytest.approx(expected)


def test_raw_prototype_accuracy_on_a_separable_toy_set():
    classes = np.repeat(np.arange(6), 10)
    inputs = torch.from_numpy(classes[:, None] * 10.0 + np.random.default_rng(0).random((60, 3)))
    sampler = EpisodeSampler(classes, n_way=3, k_shot=1, n_query=4, seed=0)
    episodes = []
    for i in range(20):
        plan = {k: torch.from_numpy(v) for k, v in sampler.episode(i).items()}
        episodes.append(
            {**plan, "support": inputs[plan["support"]], "query": inputs[plan["query"]]}
        )
    assert raw_prototype_accuracy(episodes) == (1.0, 0.0)


def test_synthetic_baseline_is_hard_raw_and_easy_projected(synthetic):
    raw, raw_ci = raw_prototype_accuracy(synthetic.test_dataloader())
    basis = torch.from_numpy(synthetic.signal_basis).float()
    projected, _ = raw_prototype_accuracy(
        {**e, "support": e["support"] @ basis, "query": e["query"] @ basis}
        for e in synthetic.test_dataloader()
    )
    assert 0.24 < raw < 0.36 and raw_ci < 0.02
    assert 0.85 < projected < 0.95


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_way": 9}, "data.n_way=9"),
        ({"k_shot": 100, "n_query": 100}, "data.k_shot=100"),
        ({"source": "synthetic", "input_format": "tokens"}, "data.input_format='tokens'"),
        ({"source": "omniglot"}, "data.source='omniglot'"),
        ({"test_episodes": 0}, "data.test_episodes=0"),
        ({"k_shot": 0}, "data.k_shot=0"),
        ({"n_query": 0}, "data.n_query=0"),
        ({"source": "synthetic", "num_classes": 3}, "data.n_way=5 exceeds the 2 classes"),
        ({"source": "synthetic", "samples_per_class": 1}, "exceeds the 1 examples"),
        ({"source": "synthetic", "signal_dims": 0}, "data.signal_dims=0 must be >= 1"),
        ({"source": "synthetic", "noise_std": -1.0}, "data.noise_std=-1.0 must be >= 0"),
        ({"source": "synthetic", "signal_std": float("nan")}, "data.signal_std=nan"),
    ],
)
def test_invalid_config_names_the_key_before_any_data(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        FewShotDataModule(**kwargs)  # (setup, inside training, builds the data)


@pytest.mark.parametrize("source", ["rotated_digits", "synthetic"])
def test_class_sizes_checked_before_setup_are_those_setup_builds(source):
    dm = FewShotDataModule(source=source, n_query=5, num_classes=37, samples_per_class=11)
    dm.setup()
    built = {split: sorted(len(m) for m in sampler.members)
             for split, sampler in dm.samplers.items()}  # fmt: skip
    expected = split_class_sizes(source, num_classes=37, samples_per_class=11)
    assert built == {split: sorted(sizes) for split, sizes in expected.items()}
