"""Every YAML of every config group composes (and instantiates where it can here); bad input
stops the run before any work with one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from advarch.config.compose import compose_run
from advarch.config.validate import ConfigError
from advarch.pipeline import build_all, instantiate_dict
from advarch.train import run
from tests.conftest import ROOT, SMALL_TEXT

CONFIGS = ROOT / "advarch" / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


MULTI_GATE = ("mmoe", "shared_bottom", "one_gate_moe")  # tabular MMoE family, already tiny


def overrides_for(model: str) -> list[str]:
    """Data (and size) overrides a model config fits; language models get the small corpus."""
    if model in MULTI_GATE:
        return ["data=mmoe_synthetic"]
    if model.startswith("seq2seq"):
        return ["debug=tiny", "data=seq2seq_reverse"]
    if model.startswith("retro"):
        small = ["data.retrieval.chunk_size=16", "data.retrieval.embedder_dim=64"]
        return ["debug=tiny", "data=text_retrieval", *SMALL_TEXT, *small]
    return ["debug=tiny", *SMALL_TEXT]


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_builds(make_cfg, model: str) -> None:
    cfg = make_cfg([f"model={model}", *overrides_for(model)])
    _, spec, module = build_all(cfg)
    assert module.model.spec == spec


@pytest.mark.parametrize("data", options("data"))
def test_every_data_config_builds_a_spec(make_cfg, data: str) -> None:
    extra = SMALL_TEXT if data.startswith("text") else []
    cfg = make_cfg([f"data={data}", *extra])
    datamodule = instantiate(cfg.data, _convert_="all")
    assert datamodule.spec.kind in ("lm", "classification", "seq2seq", "regression")


@pytest.mark.parametrize("strategy", options("strategy"))
def test_every_strategy_config_composes(make_cfg, strategy: str) -> None:
    cfg = make_cfg([f"strategy={strategy}"])
    assert cfg.strategy._target_.startswith("advarch.strategies.")


@pytest.mark.parametrize(
    "group", ["trainer", "logger", "callbacks", "debug", "hparams_search", "experiment"]
)
def test_every_option_of_group_composes(make_cfg, group: str) -> None:
    for option in options(group):
        cfg = make_cfg([f"{group}={option}"])
        assert cfg is not None


@pytest.mark.parametrize("trainer", ["default", "cpu", "ddp_sim"])
def test_cpu_trainers_instantiate(make_cfg, trainer: str) -> None:
    cfg = make_cfg([f"trainer={trainer}"])
    assert (
        instantiate(cfg.trainer, logger=False, enable_checkpointing=False).max_steps
        == cfg.trainer.max_steps
    )


@pytest.mark.parametrize("logger", options("logger"))
def test_loggers_instantiate_offline(make_cfg, logger: str) -> None:
    loggers = instantiate_dict(make_cfg([f"logger={logger}"]).logger)
    assert any(type(lg).__name__ == "CSVLogger" for lg in loggers)  # CSV is always on


@pytest.mark.parametrize("callbacks", ["default", "with_early_stopping"])
def test_callbacks_instantiate(make_cfg, callbacks: str) -> None:
    assert instantiate_dict(make_cfg([f"callbacks={callbacks}"]).callbacks)


BAD_CONFIGS = [
    (["model.dim=abc"], r"model\.dim='abc' has the wrong type"),
    (["model.num_heads=5"], r"model\.num_heads=5 must divide model\.dim=32"),
    (["+model.dimm=3"], r"model\.dimm is not an option"),
    (["model.layers=[attn,foo]"], r"model\.layers: unknown layer 'foo'"),
    (["model.activation=relu"], r"model\.activation='relu'"),
    (["model.norm=batchnorm"], r"model\.norm='batchnorm'"),
    (["data.files=/nonexistent/*.txt"], r"data\.files='/nonexistent/\*\.txt' matches no file"),
    (["data.tokenizer=wordpiece"], r"data\.tokenizer='wordpiece'"),
    (["data.seq_len=1"], r"data\.seq_len=1"),
    (["data.val_fraction=1.5"], r"data\.val_fraction=1\.5"),
    (
        ["data.dataset=someone/corpus", "data.max_documents=null"],
        r"data\.dataset='someone/corpus' needs the Hugging Face Hub",
    ),
    (["strategy.lr=-1"], r"strategy\.lr=-1"),
    (["strategy.lr=fast"], r"strategy\.lr='fast' has the wrong type"),
    (["+strategy.momentum=0.9"], r"strategy\.momentum is not an option"),
    (["ckpt_path=/nonexistent/last.ckpt"], r"ckpt_path='/nonexistent/last\.ckpt' is not a file"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS, ids=[o[0][0] for o in BAD_CONFIGS])
def test_bad_config_is_one_clear_error(
    make_cfg, tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = make_cfg(["debug=tiny", *SMALL_TEXT, *overrides])
    with pytest.raises(ConfigError, match=message) as info:
        run(cfg)
    assert "\n" not in str(info.value)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_unknown_group_option_names_it(make_cfg) -> None:
    with pytest.raises(HydraException, match="model/nope"):
        make_cfg(["model=nope"])


def test_cli_default_logs_csv_and_wandb_offline(tmp_path: Path) -> None:
    cfg = compose_run([], tmp_path)  # no test-suite overrides: what `python train.py` composes
    assert set(cfg.logger) == {"csv", "wandb"}
    assert cfg.logger.wandb.offline is True
    assert cfg.logger.wandb.save_dir == str(tmp_path)


def test_ewc_search_sweeps_keys_of_its_experiment(make_cfg) -> None:
    search = yaml.safe_load((ROOT / "advarch/configs/hparams_search/ewc_optuna.yaml").read_text())
    cfg = make_cfg(["experiment=ewc_permuted_digits", "hparams_search=ewc_optuna"])
    assert cfg.optimized_metric == "cl/avg_acc"
    for key in search["hydra"]["sweeper"]["params"]:
        assert OmegaConf.select(cfg, key) is not None, key  # a typo would sweep nothing
