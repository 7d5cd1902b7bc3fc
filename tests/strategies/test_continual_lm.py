"""Continual language modelling over text domains, end to end through the CLI's config path."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from advarch.train import run

# `python train.py strategy=<s> debug=tiny` plus a small slice of each domain
STREAM = [
    "debug=tiny",
    "data.max_documents=6",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.max_eval_sequences=4",
    "callbacks.rich_progress_bar=null",
]
FISHER = ["strategy.fisher_samples=4", "strategy.fisher_chunk_size=2"]


def bpb_matrix(run_dir: Path) -> np.ndarray:
    with (run_dir / "continual" / "bpb_matrix.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["trained_through", "text", "net", "concurrency", "codecs"]
    return np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def test_ewc_on_text_domains_fills_the_bpb_matrix(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(["model=moe", "strategy=ewc", *STREAM, *FISHER])  # data: its default
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    B = bpb_matrix(out)
    assert B.shape == (4, 4) and np.isfinite(B).all() and (B > 0).all()
    assert (out / "plots" / "bpb_matrix.png").is_file()
    for key in ("cl/avg_bpb", "cl/bwt", "cl/fwt", "cl/forgetting", "test/avg_bpb"):
        assert math.isfinite(metrics[key]), key
    assert metrics["cl/avg_bpb"] == pytest.approx(B[-1].mean(), rel=1e-5)
    # differences of the CSV's entries (6 decimals): within their rounding, not a relative 1e-5
    assert metrics["cl/bwt"] == pytest.approx(np.mean(np.diag(B)[:-1] - B[-1, :-1]), abs=2e-6)
    assert metrics["cl/forgetting"] == pytest.approx(
        np.mean(B[-1, :-1] - B[:-1, :-1].min(axis=0)), abs=2e-6
    )
    assert {f"test/task_{j}/bpb" for j in range(4)} <= metrics.keys()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(ckpt["ewc"]["importances"]) == 3  # consolidated after every domain but the last
    assert ckpt["epoch"] == 4 - 1 or ckpt["epoch"] == 4  # every domain trained


def test_ewc_with_lambda_zero_equals_naive_exactly(make_cfg, tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("naive", []), ("ewc", ["strategy.ewc_lambda=0", *FISHER])):
        cfg = make_cfg([f"strategy={name}", *STREAM, *extra], output_dir=tmp_path / name)
        run(cfg)
        runs[name] = Path(cfg.paths.output_dir)
    np.testing.assert_array_equal(bpb_matrix(runs["ewc"]), bpb_matrix(runs["naive"]))
    naive, ewc = final_state(runs["naive"]), final_state(runs["ewc"])
    assert naive.keys() == ewc.keys()
    assert all(torch.equal(naive[k], ewc[k]) for k in naive)


@pytest.mark.parametrize(
    "extra",
    [
        ["strategy=naive", "strategy.joint=true"],
        [
            "strategy=naive",
            "strategy.expert_masks=true",
            "data.scenario=task",
            "strategy.freeze_shared_after_first_task=true",
        ],
        ["strategy=ewc", "strategy.mode=online", "strategy.gamma=0.5", *FISHER],
    ],
    ids=["joint", "expert_masks", "online_ewc"],
)
def test_variants_run_on_text_domains(make_cfg, extra: list[str]) -> None:
    cfg = make_cfg([*extra, *STREAM])
    metrics = run(cfg)
    B = bpb_matrix(Path(cfg.paths.output_dir))
    assert np.isfinite(B).all()
    if "strategy.expert_masks=true" in extra:  # each domain owns its experts, the rest frozen
        assert metrics["cl/forgetting"] == 0 and metrics["cl/bwt"] == 0


def test_exact_fisher_is_refused_for_language_models(make_cfg) -> None:
    from advarch.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.fisher_estimator=exact"):
        run(make_cfg(["strategy=ewc", "strategy.fisher_estimator=exact", *STREAM]))


def test_new_experts_for_a_new_domain_on_a_frozen_base(make_cfg, tmp_path: Path) -> None:
    base_cfg = make_cfg(
        ["strategy=naive", "data.domains=[text,net]", *STREAM], output_dir=tmp_path / "base"
    )
    run(base_cfg)
    base_ckpt = Path(base_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = make_cfg(
        [
            "strategy=finetune",
            f"strategy.pretrained={base_ckpt}",
            "strategy.new_experts=2",
            "strategy.trainable=[]",
            "data=text_domains",
            "data.domains=[codecs]",
            *STREAM,
        ],
        output_dir=tmp_path / "grow",
    )
    metrics = run(cfg)
    assert math.isfinite(metrics["test/bpb"])
    base, grown = final_state(base_ckpt.parent.parent), final_state(Path(cfg.paths.output_dir))
    router = next(k for k in base if k.endswith(".router"))
    assert grown[router].shape[0] == base[router].shape[0] + 2  # two new experts per layer
    assert torch.equal(grown[router][: base[router].shape[0]], base[router])  # old rows kept
