"""Rebuilding a language model from its checkpoint: bad checkpoints are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advarch.errors import ConfigError
from advarch.trained_lm import load_lm
from tests.conftest import SMALL_TEXT


def save_checkpoint(make_cfg, tmp_path: Path, overrides: list[str]) -> Path:
    """An untrained module saved as `trainer.save_checkpoint` would (state dict + cfg)."""
    from advarch.pipeline import build_all

    cfg = make_cfg(["debug=tiny", *overrides])
    _, _, module = build_all(cfg)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def test_load_lm_rebuilds_the_saved_weights(make_cfg, tmp_path: Path) -> None:
    ckpt = save_checkpoint(make_cfg, tmp_path, ["data=text", "model=transformer", *SMALL_TEXT])
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    lm = load_lm(str(ckpt))
    assert not lm.model.training and lm.retrieve is None
    assert lm.tokenizer.decode(lm.tokenizer.encode_batch(["héllo"])[0]) == "héllo"
    weights = lm.model.state_dict()
    assert weights.keys() == {k.removeprefix("model.") for k in saved if k.startswith("model.")}
    for name, value in weights.items():
        torch.testing.assert_close(value, saved[f"model.{name}"], rtol=0, atol=0)


def test_load_lm_rebuilds_a_finetune_that_added_experts(make_cfg, tmp_path: Path) -> None:
    # the strategy grows the model: rebuilding the plain model would not fit the weights
    base = save_checkpoint(make_cfg, tmp_path / "base", ["model=moe", *SMALL_TEXT])
    grown = save_checkpoint(make_cfg, tmp_path / "grown", [
        "model=moe", *SMALL_TEXT, "strategy=finetune", f"strategy.pretrained={base}",
        "strategy.new_experts=2"])  # fmt: skip
    base.unlink()  # generation needs the fine-tune's checkpoint alone
    lm = load_lm(str(grown))
    saved = torch.load(grown, weights_only=False)["state_dict"]
    for name, value in lm.model.state_dict().items():
        torch.testing.assert_close(value, saved[f"model.{name}"], rtol=0, atol=0)
    assert lm.model.layers[0].ffn.router.shape[0] == 8 + 2


def _corpus(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"d{i}.txt").write_text(f"document {i} " * 100)
    return folder


def test_load_lm_rejects_bad_checkpoints(make_cfg, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a file"):
        load_lm(str(tmp_path / "missing.ckpt"))
    ckpt = save_checkpoint(make_cfg, tmp_path, ["data=digits", "model=transformer"])
    with pytest.raises(ConfigError, match="classification model; generation needs"):
        load_lm(str(ckpt))
    corpus = _corpus(tmp_path / "corpus")
    files = ["data=text", "model=transformer", *SMALL_TEXT, f"data.files={corpus}/*.txt"]
    gone = save_checkpoint(make_cfg, tmp_path / "gone", files)
    for f in corpus.iterdir():  # the training files moved away
        f.unlink()
    with pytest.raises(ConfigError, match=r"^data.files='.*corpus/\*.txt' matches no file$"):
        load_lm(str(gone))
    ckpt = save_checkpoint(make_cfg, tmp_path, ["data=selective_copying", "model=transformer"])
    with pytest.raises(ConfigError, match="holds a model of token ids without text .* trained on"):
        load_lm(str(ckpt))
    ckpt = save_checkpoint(make_cfg, tmp_path, ["data=text", "model=transformer", *SMALL_TEXT])
    state = torch.load(ckpt, weights_only=False)
    state["hyper_parameters"]["cfg"]["model"]["dim"] *= 2  # the rebuilt model no longer fits
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match="weights do not fit the model"):
        load_lm(str(ckpt))


def test_a_checkpoint_with_nan_weights_is_one_line(make_cfg, tmp_path: Path) -> None:
    # bytes damaged inside an intact archive: eval printed loss nan and exited 0
    from advarch.eval import evaluate

    ckpt = save_checkpoint(make_cfg, tmp_path, ["data=text", "model=transformer", *SMALL_TEXT])
    state = torch.load(ckpt, weights_only=False)
    name = next(k for k in state["state_dict"] if k.endswith("q_proj.weight"))
    state["state_dict"][name][0, 0] = float("nan")
    torch.save(state, ckpt)
    expected = f"parameter '{name.removeprefix('model.')}' holds NaN or inf"
    with pytest.raises(ConfigError, match=expected):
        load_lm(str(ckpt))
    with pytest.raises(ConfigError, match=f"parameter 'model.{name[6:]}' holds NaN or inf"):
        evaluate(make_cfg([f"ckpt_path={ckpt}", "wandb=false"], "eval", tmp_path / "eval"))


def test_generation_of_a_fine_tune_routes_as_it_trained(make_cfg, tmp_path: Path) -> None:
    # hunter 38: a fine-tune of a continual expert-mask LM base (3 domains on 8 experts: 2
    # owned by none, closed) keeps them closed and saves `open_experts` in its checkpoint;
    # eval.py restored them, load_lm (scripts/generate.py) did not: 98.7 % of its logits came
    # from a model routing to experts that never trained
    from advarch.pipeline import build_all
    from advarch.strategies.base import open_experts

    def save(module, path: Path, **entries) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
        torch.save({**state, **entries}, path)
        return path

    closed = [True] * 6 + [False] * 2
    _, _, base = build_all(make_cfg(["debug=tiny", "model=moe", *SMALL_TEXT]))
    base_path = save(base, tmp_path / "base" / "model.ckpt", open_experts=closed)
    _, _, tuned = build_all(make_cfg(["debug=tiny", "model=moe", *SMALL_TEXT, "strategy=finetune",
                                      f"strategy.pretrained={base_path}",
                                      "strategy.new_experts=2"]))  # fmt: skip
    assert tuned.model.layers[0].ffn.open_experts.tolist() == [*closed, True, True]  # (premise)
    path = save(tuned, tmp_path / "tuned" / "model.ckpt", open_experts=open_experts(tuned.model))
    lm = load_lm(str(path))
    ids = torch.randint(0, 200, (4, 48))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, tuned.model.eval()(ids).logits)
    assert all(m.open_experts.tolist() == [*closed, True, True] for m in lm.model.moe_layers())
