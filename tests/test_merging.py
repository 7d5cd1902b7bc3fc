"""Tests for advarch.merging: method semantics, rules, MoE slices, checkpoints and the script."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from advarch.merging import (
    MergeConfig,
    MergeSummary,
    merge_checkpoints,
    merge_state_dicts,
    merge_tensor,
)
from tests.cli import Project
from tests.conftest import ROOT, TrainedRun


def ties_reference(
    base: torch.Tensor,
    models: list[torch.Tensor],
    weights: list[float],
    densities: list[float],
    lam: float,
) -> torch.Tensor:
    """TIES (Yadav et al. 2023, Alg. 1) one coordinate at a time, per-tensor trim."""
    b = base.flatten().tolist()
    n = len(b)
    trimmed = []
    for m, rho in zip(models, densities, strict=True):
        tau = [x - y for x, y in zip(m.flatten().tolist(), b, strict=True)]
        kth = sorted((abs(v) for v in tau), reverse=True)[max(1, round(rho * n)) - 1]
        trimmed.append([v if abs(v) >= kth else 0.0 for v in tau])
    out = []
    for j in range(n):
        entries = [w * tau[j] for w, tau in zip(weights, trimmed, strict=True)]
        sign = 1.0 if sum(entries) >= 0 else -1.0
        agree = [(e, w) for e, w in zip(entries, weights, strict=True) if e * sign > 0]
        mean = sum(e for e, _ in agree) / sum(abs(w) for _, w in agree) if agree else 0.0
        out.append(b[j] + lam * mean)
    return torch.tensor(out, dtype=base.dtype).view_as(base)


class TinyNet(nn.Module):
    """A dense layer, a stacked MoE expert tensor, a router, a head and an int buffer."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.experts = nn.Parameter(torch.randn(2, 6, 4))  # (E, D, H)
        self.router = nn.Linear(6, 2, bias=False)
        self.head = nn.Linear(6, classes)
        self.register_buffer("steps", torch.tensor(7, dtype=torch.long))


class TinyModule(L.LightningModule):
    """The pipeline's layout: the nn.Module at `self.model`, config in hyper_parameters."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = TinyNet(cfg["classes"])


def fake_checkpoint(path: Path, seed: int, classes: int = 3) -> Path:
    """Write a Lightning-style checkpoint of a TinyModule with seeded weights."""
    torch.manual_seed(seed)
    module = TinyModule({"classes": classes})
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": {"cfg": {"classes": classes}},
            "pytorch-lightning_version": L.__version__,
            "epoch": 1,
            "global_step": 10,
            "optimizer_states": [{"state": {0: torch.zeros(100)}}],
            "lr_schedulers": [],
            "loops": {"fit_loop": {}},
            "callbacks": {},
        },
        path,
    )
    return path


def rand_sd(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(5, 4, generator=g, dtype=dtype),
        "b": torch.randn(7, generator=g, dtype=dtype),
        "moe.experts.w1": torch.randn(3, 4, 2, generator=g, dtype=dtype),
        "count": torch.tensor(seed, dtype=torch.long),
    }


def merge(method: str, base, models, **kw) -> dict[str, torch.Tensor]:
    return merge_state_dicts(base, models, MergeConfig(method=method, **kw))


# ----------------------------------------------------------------------------- method semantics


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_lambda_zero_returns_base(method: str) -> None:
    base, models = rand_sd(0), [rand_sd(1), rand_sd(2)]
    out = merge(method, base, models, lam=0.0, density=0.5)
    for k in base:
        torch.testing.assert_close(out[k], base[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    "method", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "linear"]
)
def test_one_model_lambda_one_returns_it(method: str) -> None:
    base, model = rand_sd(0), rand_sd(1)
    out = merge(method, base, [model], lam=1.0)
    for k in base:
        expected = base[k] if k == "count" else model[k]
        torch.testing.assert_close(out[k], expected)


def test_task_arithmetic_weights_and_negation() -> None:
    base, a, b = rand_sd(0), rand_sd(1), rand_sd(2)
    out = merge("task_arithmetic", base, [a, b], weights=[0.5, -1.0], lam=0.8)
    expected = base["w"] + 0.8 * (0.5 * (a["w"] - base["w"]) - (b["w"] - base["w"]))
    torch.testing.assert_close(out["w"], expected)


def test_linear_is_normalised_weighted_average() -> None:
    base, a, b = rand_sd(0), rand_sd(1), rand_sd(2)
    out = merge("linear", base, [a, b], weights=[1.0, 3.0])
    torch.testing.assert_close(out["b"], 0.25 * a["b"] + 0.75 * b["b"])


def test_ties_density_one_agreeing_signs_is_mean_task_vector() -> None:
    base = rand_sd(0)
    taus = [torch.rand(5, 4, dtype=torch.float64) + 0.1 for _ in range(3)]  # all positive
    models = [{**base, "w": base["w"] + tau} for tau in taus]
    out = merge("ties", base, models, density=1.0)
    torch.testing.assert_close(out["w"], base["w"] + torch.stack(taus).mean(0))


def test_ties_sign_election_hand_made() -> None:
    base = {"x": torch.zeros(3, dtype=torch.float64)}
    deltas = [[1.0, 3.0, 0.5], [2.0, -1.0, -0.5], [-4.0, -1.0, 0.0]]
    models = [{"x": torch.tensor(d, dtype=torch.float64)} for d in deltas]
    out = merge("ties", base, models, density=1.0)
    # coordinate 0: mass −1 elects −, only −4 agrees; 1: mass +1 elects +, only 3 agrees;
    # 2: mass 0 elects +, only 0.5 agrees (the trimmed 0 never agrees).
    torch.testing.assert_close(out["x"], torch.tensor([-4.0, 3.0, 0.5], dtype=torch.float64))


def test_ties_with_a_negative_weight_moves_against_that_task() -> None:
    # coordinate 0: only the negated model agrees with the elected sign; its mean must be −τ₂,
    # as task arithmetic gives, not +τ₂ (dividing by the signed weight flipped it back)
    base = {"x": torch.zeros(4, dtype=torch.float64)}
    deltas = [[1.0, 1.0, -1.0, 0.5], [2.0, -1.0, -1.0, 0.5]]
    models = [{"x": torch.tensor(d, dtype=torch.float64)} for d in deltas]
    out = merge("ties", base, models, weights=[1.0, -1.0], density=1.0)
    torch.testing.assert_close(out["x"], torch.tensor([-2.0, 1.0, 1.0, 0.5], dtype=torch.float64))


def test_ties_trim_drops_small_entries() -> None:
    base = {"x": torch.zeros(4, dtype=torch.float64)}
    model = {"x": torch.tensor([0.1, -5.0, 0.2, 3.0], dtype=torch.float64)}
    out = merge("ties", base, [model], density=0.5)
    torch.testing.assert_close(out["x"], torch.tensor([0.0, -5.0, 0.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_ties_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(6, 5, generator=g, dtype=torch.float64)}
    models = [
        {"w": base["w"] + torch.randn(6, 5, generator=g, dtype=torch.float64)} for _ in range(3)
    ]
    weights, densities = [1.0, 0.5 if seed % 2 else -0.5, 2.0], [0.2, 0.5, 0.9]
    out = merge("ties", base, models, weights=weights, density=densities, lam=0.7)
    expected = ties_reference(base["w"], [m["w"] for m in models], weights, densities, 0.7)
    torch.testing.assert_close(out["w"], expected)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_one_is_identity_of_underlying_method(method: str) -> None:
    base, models = rand_sd(0), [rand_sd(1), rand_sd(2)]
    plain = "task_arithmetic" if method == "dare_linear" else "ties"
    out, ref = merge(method, base, models, density=1.0), merge(plain, base, models, density=1.0)
    for k in base:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0)


def test_dare_is_seeded() -> None:
    base, models = rand_sd(0), [rand_sd(1)]
    a = merge("dare_linear", base, models, density=0.3, seed=5)
    b = merge("dare_linear", base, models, density=0.3, seed=5)
    c = merge("dare_linear", base, models, density=0.3, seed=6)
    torch.testing.assert_close(a["w"], b["w"], rtol=0, atol=0)
    assert not torch.equal(a["w"], c["w"])
    dropped = (a["w"] == base["w"]).double().mean().item()
    assert 0.4 < dropped < 0.95  # about 1 − density of the entries revert to the base


def test_dare_unbiased_in_expectation() -> None:
    g = torch.Generator().manual_seed(0)
    base_t = torch.randn(400, generator=g, dtype=torch.float64)
    tau = torch.randn(400, generator=g, dtype=torch.float64)
    density, seeds = 0.5, 300
    cfgs = (MergeConfig(method="dare_linear", density=density, seed=s) for s in range(seeds))
    mean = torch.stack([merge_tensor("x", base_t, [base_t + tau], c) - base_t for c in cfgs]).mean(
        0
    )
    sigma = tau.abs() * math.sqrt((1 - density) / (density * seeds))  # std of the seed mean
    assert ((mean - tau).abs() <= 5 * sigma + 1e-12).all()


def test_dare_l1_rescale_keeps_l1_norm() -> None:
    base, model = rand_sd(0), rand_sd(1)
    out = merge("dare_linear", base, [model], density=0.3, dare_rescale="l1", per_expert=False)
    for k in ("w", "b", "moe.experts.w1"):
        before, after = (model[k] - base[k]).abs().sum(), (out[k] - base[k]).abs().sum()
        torch.testing.assert_close(after, before)


def test_slerp_endpoints_and_orthogonal_midpoint() -> None:
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    cfg = MergeConfig(method="slerp", t=0.0)
    torch.testing.assert_close(merge_tensor("x", e1, [e2], cfg), e1)
    torch.testing.assert_close(merge_tensor("x", e1, [e2], MergeConfig(method="slerp", t=1.0)), e2)
    mid = merge_tensor("x", 2 * e1, [2 * e2], MergeConfig(method="slerp", t=0.5))
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(2), math.sqrt(2)]))  # norm 2 kept
    third = merge_tensor("x", e1, [e2], MergeConfig(method="slerp", t=1 / 3))
    torch.testing.assert_close(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))


def test_slerp_colinear_falls_back_to_lerp() -> None:
    v = torch.tensor([1.0, 2.0, 3.0])
    out = merge_tensor("x", v, [3 * v], MergeConfig(method="slerp", t=0.25))
    torch.testing.assert_close(out, 1.5 * v)
    assert torch.isfinite(merge_tensor("x", torch.zeros(3), [v], MergeConfig(method="slerp"))).all()


def test_slerp_per_expert_slices() -> None:
    base = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # (E, 2): expert 0, expert 1
    model = torch.tensor([[0.0, 1.0], [0.0, 4.0]])  # expert 0 rotates, expert 1 is colinear
    out = merge_tensor(
        "model.layers.0.ffn.w_out", base, [model], MergeConfig(method="slerp", t=0.5)
    )
    r = math.sqrt(0.5)
    torch.testing.assert_close(out, torch.tensor([[r, r], [0.0, 3.0]]))


# ---------------------------------------------------------------------------- MoE and trimming


def test_per_expert_trim_differs_from_whole_tensor() -> None:
    base = {"model.layers.0.ffn.w_in": torch.zeros(2, 4, dtype=torch.float64)}
    delta = torch.tensor([[10.0, 9.0, 8.0, 7.0], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    models = [{"model.layers.0.ffn.w_in": delta}]
    per_expert = merge("ties", base, models, density=0.5)["model.layers.0.ffn.w_in"]
    whole = merge("ties", base, models, density=0.5, per_expert=False)["model.layers.0.ffn.w_in"]
    torch.testing.assert_close(
        whole, delta * torch.tensor([[1.0] * 4, [0.0] * 4], dtype=torch.float64)
    )
    torch.testing.assert_close(
        per_expert, delta * torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0.0]], dtype=torch.float64)
    )
    renamed = merge("ties", base, models, density=0.5, expert_patterns=["*.mlp.*"])
    torch.testing.assert_close(renamed["model.layers.0.ffn.w_in"], whole)


def test_global_trim_differs_from_per_tensor_and_matches_reference() -> None:
    base = {
        "big": torch.zeros(4, dtype=torch.float64),
        "small": torch.zeros(4, dtype=torch.float64),
    }
    model = {
        "big": torch.tensor([4.0, -3.0, 2.0, 1.5], dtype=torch.float64),
        "small": torch.tensor([0.4, -0.3, 0.2, 1.8], dtype=torch.float64),
    }
    glob = merge("ties", base, [model], density=0.5, ties_trim="global")
    per = merge("ties", base, [model], density=0.5)
    # global: the top 4 of all 8 magnitudes are 4, 3, 2, 1.8
    torch.testing.assert_close(
        glob["big"], torch.tensor([4.0, -3.0, 2.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        glob["small"], torch.tensor([0.0, 0.0, 0.0, 1.8], dtype=torch.float64)
    )
    torch.testing.assert_close(per["big"], torch.tensor([4.0, -3.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(
        per["small"], torch.tensor([0.4, 0.0, 0.0, 1.8], dtype=torch.float64)
    )


@pytest.mark.parametrize("seed", range(3))
def test_global_trim_matches_concatenated_reference(seed: int) -> None:
    base, models = rand_sd(seed), [rand_sd(seed + 10), rand_sd(seed + 20)]
    out = merge("ties", base, models, density=[0.3, 0.6], ties_trim="global")
    keys = ["w", "b", "moe.experts.w1"]
    flat = lambda sd: torch.cat([sd[k].flatten() for k in keys])  # noqa: E731
    expected = ties_reference(flat(base), [flat(m) for m in models], [1.0, 1.0], [0.3, 0.6], 1.0)
    torch.testing.assert_close(flat(out), expected)


@pytest.mark.parametrize(
    ("method", "options"), [("dare_linear", {"density": 0.5}),
                            ("ties", {"density": 0.4, "ties_trim": "global"})],
)  # fmt: skip
def test_a_tied_tensor_is_merged_once_and_stays_tied(method: str, options: dict) -> None:
    # a language model's head tied to its input embedding: one tensor under two names. Two
    # DARE draws (seeded by name) untied it; a global TIES threshold counted it twice
    def tied(seed: int) -> dict[str, torch.Tensor]:
        sd = rand_sd(seed)
        return {"input.weight": sd["w"], "b": sd["b"], "head.weight": sd["w"]}

    base, models = tied(0), [tied(1), tied(2)]
    out = merge(method, base, models, **options)
    assert out["head.weight"] is out["input.weight"]
    once = [{k: v for k, v in sd.items() if k != "head.weight"} for sd in (base, *models)]
    alone = merge(method, once[0], once[1:], **options)
    for key in ("input.weight", "b"):
        torch.testing.assert_close(out[key], alone[key], rtol=0, atol=0)
    untied = [{k: v.clone() for k, v in sd.items()} for sd in (base, *models)]
    assert not merge(method, untied[0], untied[1:], **options)["head.weight"].equal(
        out["head.weight"]
    )  # (each name merged by its own draw / with the threshold counting both)


def test_non_float_tensors_copied_from_base() -> None:
    base, models = rand_sd(0), [rand_sd(1), rand_sd(2)]
    out = merge("ties", base, models, density=0.5)
    assert out["count"] is base["count"]


def test_dtype_preserved() -> None:
    base, models = rand_sd(0, torch.bfloat16), [rand_sd(1, torch.bfloat16)]
    out = merge("task_arithmetic", base, models, lam=0.5)
    assert all(out[k].dtype == base[k].dtype for k in base)


# ------------------------------------------------------------------------------ rules and errors


def test_rules_keep_and_base_policies() -> None:
    base, a, b = rand_sd(0), rand_sd(1), rand_sd(2)
    rules = [{"pattern": "moe.*", "keep": 1}, {"pattern": "b", "policy": "base"}]
    summary = MergeSummary()
    out = merge_state_dicts(base, [a, b], MergeConfig(method="ties", rules=rules), summary=summary)
    assert out["moe.experts.w1"] is b["moe.experts.w1"]
    assert out["b"] is base["b"]
    assert not torch.equal(out["w"], base["w"])
    assert (summary.merged, summary.copied_from_base, summary.kept_from_model) == (1, 2, 1)


def test_rules_override_parameters_first_match_wins() -> None:
    base, a = rand_sd(0), rand_sd(1)
    rules = [{"pattern": "w", "lambda": 0.5}, {"pattern": "*", "lambda": 2.0, "weights": [3.0]}]
    out = merge("task_arithmetic", base, [a], rules=rules)
    torch.testing.assert_close(out["w"], base["w"] + 0.5 * (a["w"] - base["w"]))
    torch.testing.assert_close(out["b"], base["b"] + 6.0 * (a["b"] - base["b"]))


def test_keep_rule_covers_shape_and_key_mismatch() -> None:
    base, a = rand_sd(0), rand_sd(1)
    a = {**a, "head": torch.randn(5), "extra": torch.randn(2)}
    base = {**base, "head": torch.randn(3)}
    rules = [{"pattern": "head", "keep": 0}, {"pattern": "extra", "policy": "base"}]
    summary = MergeSummary()
    out = merge_state_dicts(base, [a], MergeConfig(rules=rules), summary=summary)
    assert out["head"] is a["head"] and "extra" not in out and summary.dropped == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("b"), r"tensor 'b' is missing from models\[1\]"),
        (
            lambda sd: sd.update(w=torch.zeros(4, 5)),
            r"tensor 'w' has shape \(4, 5\) in models\[1\]",
        ),
        (
            lambda sd: sd.update(new=torch.zeros(1)),
            r"tensor 'new' is in models\[1\] but not in base",
        ),
    ],
)
def test_mismatches_refused_naming_tensor(edit, message: str) -> None:
    base, a, b = rand_sd(0), rand_sd(1), rand_sd(2)
    edit(b)
    with pytest.raises(ValueError, match=message):
        merge("ties", base, [a, b])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"density": 1.5}, r"density=1.5 must be in \(0, 1\]"),
        ({"method": "soup"}, r"method='soup' must be one of"),
        ({"ties_trim": "layer"}, r"ties_trim='layer' must be one of"),
        ({"t": 2.0}, r"t=2.0 must be in \[0, 1\]"),
        ({"rules": [{"pattern": "*", "density": 0.0}]}, r"rules\[0\].density=0.0 must be"),
        ({"rules": [{"pattern": "*", "policy": "copy"}]}, r"rules\[0\].policy='copy'"),
        ({"rules": [{"pattern": "*", "wieght": 1}]}, r"rules\[0\].wieght is not a rule key"),
        ({"rules": [{"pattern": "*", "policy": "keep"}]}, r"needs rules\[0\].keep"),
    ],
)
def test_config_validation_names_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MergeConfig(**kwargs)


def test_a_rule_that_matches_no_tensor_names_similar_ones() -> None:
    rules = [{"pattern": "*.ffn.router", "keep": 0}, {"pattern": "*.router.*", "keep": 0}]
    base = {"model.layers.0.ffn.router": torch.zeros(2), "model.head.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"rules\[1\].pattern='\*.router.\*' matches no "
                       r"tensor \(names look like model.layers.0.ffn.router\)$"):  # fmt: skip
        merge_state_dicts(base, [base], MergeConfig(rules=rules))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weights": [1.0]}, "weights has 1 entries but models has 2"),
        ({"density": [0.5, 0.5, 0.5]}, "density has 3 entries but models has 2"),
        ({"rules": [{"pattern": "*", "keep": 2}]}, r"rules\[0\].keep=2 is out of range"),
        ({"method": "slerp"}, "method=slerp interpolates"),
    ],
)
def test_config_checked_against_model_count(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        merge_state_dicts(rand_sd(0), [rand_sd(1), rand_sd(2)], MergeConfig(**kwargs))


def test_from_dict_maps_lambda() -> None:
    cfg = MergeConfig.from_dict(
        {"method": "ties", "lambda": 0.3, "rules": [{"pattern": "*", "lambda": 2}]}
    )
    assert cfg.lam == 0.3 and cfg.rules[0].lam == 2
    with pytest.raises(ValueError, match="lamda is not a merge config key"):
        MergeConfig.from_dict({"lamda": 1.0})


TASK_VECTORS = "(it applies to task_arithmetic, ties, dare_linear, dare_ties)"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"method": "linear", "density": 0.2},
            "density=0.2 has no effect with method=linear (it applies to ties, dare_linear, "
            "dare_ties)",
        ),
        (
            {"method": "slerp", "lambda": 3},
            f"lambda=3 has no effect with method=slerp {TASK_VECTORS}",
        ),
        (
            {"method": "ties", "t": 0.3},
            "t=0.3 has no effect with method=ties (it applies to slerp)",
        ),
        ({"method": "slerp", "weights": [2.0]}, "weights=[2.0] has no effect with method=slerp"),
        (
            {"method": "ties", "seed": 3},
            "seed=3 has no effect with method=ties (it applies to dare_",
        ),
        (
            {"method": "dare_ties", "ties_trim": "global"},
            "ties_trim=global has no effect with method",
        ),
        (
            {"method": "ties", "dare_rescale": "l1"},
            "dare_rescale=l1 has no effect with method=ties",
        ),
        (
            {"method": "linear", "rules": [{"pattern": "*", "lambda": 0.5}]},
            f"rules[0].lambda=0.5 has no effect with method=linear {TASK_VECTORS}",
        ),
    ],
)
def test_an_option_the_method_never_reads_is_refused(raw: dict, message: str) -> None:
    # (the merge was tensor-for-tensor the one without it)
    with pytest.raises(ValueError) as err:
        MergeConfig.from_dict(raw)
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    "method", ["linear", "task_arithmetic", "ties", "dare", "dare_ties", "slerp"]
)
def test_merge_yaml_defaults_are_taken_by_every_method(method: str) -> None:
    raw = OmegaConf.to_container(OmegaConf.load(ROOT / "advarch/configs/merge.yaml"))
    for key in ("defaults", "run_name", "base", "models", "out", "hydra"):
        del raw[key]
    assert MergeConfig.from_dict({**raw, "method": method}).method == method


def test_in_memory_inputs_unchanged() -> None:
    base, models = rand_sd(0), [rand_sd(1), rand_sd(2)]
    copies = [{k: v.clone() for k, v in sd.items()} for sd in (base, *models)]
    for method in ("ties", "dare_ties", "linear", "task_arithmetic"):
        merge(method, base, models, density=0.4)
    for sd, copy in zip((base, *models), copies, strict=True):
        assert all(torch.equal(sd[k], copy[k]) for k in sd)


# ---------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def ckpts(tmp_path: Path) -> tuple[Path, list[Path]]:
    return fake_checkpoint(tmp_path / "base.ckpt", 0), [
        fake_checkpoint(tmp_path / f"m{i}.ckpt", i + 1) for i in range(2)
    ]


def test_merge_checkpoints_loads_and_leaves_inputs_intact(ckpts, tmp_path: Path) -> None:
    base_path, model_paths = ckpts
    before = [p.read_bytes() for p in (base_path, *model_paths)]
    cfg = MergeConfig(method="ties", density=0.2, rules=[{"pattern": "*.router.*", "keep": 1}])
    out = merge_checkpoints(base_path, model_paths, cfg, tmp_path / "sub" / "merged.ckpt")
    assert [p.read_bytes() for p in (base_path, *model_paths)] == before
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["merged.ckpt"]  # no tmp left
    ckpt = torch.load(out, weights_only=True)
    assert {"state_dict", "hyper_parameters", "pytorch-lightning_version", "epoch"} <= set(ckpt)
    assert not set(ckpt) & {"optimizer_states", "lr_schedulers", "loops", "callbacks"}
    assert ckpt["advarch_merge"]["config"]["density"] == 0.2
    module = TinyModule.load_from_checkpoint(out)
    models = [torch.load(p, weights_only=True)["state_dict"] for p in model_paths]
    torch.testing.assert_close(module.model.router.weight, models[1]["model.router.weight"])
    assert int(module.model.steps) == 7
    expected = merge_state_dicts(
        torch.load(base_path, weights_only=True)["state_dict"], models, cfg
    )
    for k, v in module.state_dict().items():
        torch.testing.assert_close(v, expected[k])


def test_merge_checkpoints_errors_name_checkpoint(ckpts, tmp_path: Path) -> None:
    base_path, model_paths = ckpts
    other = fake_checkpoint(tmp_path / "wide.ckpt", 5, classes=4)
    with pytest.raises(
        ValueError, match=r"'model.head.weight' has shape \(4, 6\) in models\[1\] \(.*wide.ckpt\)"
    ):
        merge_checkpoints(base_path, [model_paths[0], other], MergeConfig(), tmp_path / "o.ckpt")
    with pytest.raises(ValueError, match="would overwrite input"):
        merge_checkpoints(base_path, model_paths, MergeConfig(), model_paths[0])


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_script_overrides_change_the_merge_of_trained_checkpoints(
    project: Project, trained: dict[str, TrainedRun]
) -> None:
    """scripts/merge.py on two CLI-trained LMs; expected values written out by hand."""
    base, other = trained["lm"].ckpt, trained["lm_seed1"].ckpt
    common = [f"base={base}", f"models=[{other}]"]
    outs = {name: project.root / f"{name}.ckpt" for name in ("ta", "ties")}
    merge = "scripts/merge.py"
    res = project.run(
        "method=task_arithmetic", *common, "lambda=0.5", f"out={outs['ta']}", script=merge
    )
    lines = res.check().stdout.splitlines()
    assert lines[0] == "merge: task_arithmetic" and f"  base               {base}" in lines
    assert f"  out                {outs['ta']}" in lines  # whole paths, to copy
    assert any(line.startswith("  tensors merged") for line in lines)
    project.run("method=ties", *common, "density=0.2", f"out={outs['ties']}", script=merge).check()
    b, o = state(base), state(other)
    ta, ties = state(outs["ta"]), state(outs["ties"])
    assert ta.keys() == ties.keys() == b.keys()
    for k, v in b.items():
        if v.is_floating_point():  # θ₀ + λ τ, λ = 0.5 (not the default 1)
            torch.testing.assert_close(ta[k], v + 0.5 * (o[k] - v))
        else:
            assert torch.equal(ta[k], v) and torch.equal(ties[k], v)
    # TIES with one model and density 0.2 keeps the top 20% of each tensor's task vector
    for k in ("model.layers.0.mixer.q_proj.weight", "model.layers.1.mixer.out_proj.weight"):
        kept = (ties[k] != b[k]).float().mean().item()
        assert kept == pytest.approx(0.2, abs=0.01), k
    bad = project.run("method=ties", *common, "density=1.5", f"out={outs['ties']}", script=merge)
    assert bad.rc != 0 and "density=1.5 must be in (0, 1]" in bad.stderr


def test_models_of_other_model_options_are_merged_with_a_warning(tmp_path, caplog) -> None:
    # new user 40b: a soft MoE and a top-1 MoE merged into a top-2 base without a word (their
    # tensors have the same shapes); the merged checkpoint runs with the base's options
    from advarch.cli.merge import check_one_architecture

    for name, moe in (("base", {}), ("same", {"top_k": 2}), ("soft", {"soft": True})):
        cfg = {"model": {"_target_": "advarch.models.Model", "ffn": "moe", "moe": moe}}
        torch.save({"state_dict": {}, "hyper_parameters": {"cfg": cfg}}, tmp_path / f"{name}.ckpt")
    with caplog.at_level("WARNING", logger="advarch"):
        check_one_architecture(str(tmp_path / "base.ckpt"), [str(tmp_path / "same.ckpt")])
        assert not caplog.records  # (top_k=2 is the block's default: the same options)
        check_one_architecture(str(tmp_path / "base.ckpt"), [str(tmp_path / "soft.ckpt")])
    assert caplog.messages == [
        f"models[0]={str(tmp_path / 'soft.ckpt')!r} differs from base in its model options "
        "(model.moe.soft=True there, False in base): the merged checkpoint runs with base's"
    ]


def test_a_fine_tune_that_untied_its_head_merges_untied(tmp_path: Path) -> None:
    # review 42: a fine-tune with model.tie_embeddings=false (the README's frozen-embeddings
    # head) was "another architecture than base"; merged, its head must not fold back into
    # the base's embeddings as the base's tied config is loaded
    from advarch.cli.merge import check_one_architecture

    def save(name: str, tied: bool, state: dict) -> str:
        cfg = {"model": {"_target_": "advarch.models.Model", "tie_embeddings": tied}}
        torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}}, tmp_path / name)
        return str(tmp_path / name)

    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(5, 3, generator=g, dtype=torch.float64)
    base = save("base.ckpt", True, {"model.input.weight": embedding,
                                    "model.head.weight": embedding})  # fmt: skip
    head = embedding + torch.randn(5, 3, generator=g, dtype=torch.float64)
    untied = save("untied.ckpt", False, {"model.input.weight": embedding.clone(),
                                         "model.head.weight": head})  # fmt: skip
    check_one_architecture(base, [untied])
    retro = {"model": {"_target_": "advarch.models.Model", "tie_embeddings": True,
                       "retro": {"encoder_depth": 2}}}  # fmt: skip
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": retro}}, tmp_path / "retro.ckpt")
    with pytest.raises(ValueError, match=r"is another architecture than base \(model.retro="
                                         r"\{…\} there, null in base"):  # fmt: skip
        check_one_architecture(base, [str(tmp_path / "retro.ckpt")])  # (new user 42b: a warning)
    with pytest.raises(ValueError, match=r"model.tie_embeddings=True there, False in base"):
        check_one_architecture(untied, [base])  # (tying an untied base drops its head)
    cfg = MergeConfig(method="task_arithmetic", lam=0.5)
    out = torch.load(merge_checkpoints(base, [untied], cfg, tmp_path / "out.ckpt"),
                     weights_only=False)  # fmt: skip
    assert out["hyper_parameters"]["cfg"]["model"]["tie_embeddings"] is False
    torch.testing.assert_close(out["state_dict"]["model.input.weight"], embedding)
    torch.testing.assert_close(out["state_dict"]["model.head.weight"], (embedding + head) / 2)
    same = torch.load(merge_checkpoints(base, [base], cfg, tmp_path / "same.ckpt"),
                      weights_only=False)  # fmt: skip
    assert same["hyper_parameters"]["cfg"]["model"]["tie_embeddings"] is True  # (still one)
