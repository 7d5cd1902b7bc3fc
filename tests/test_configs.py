"""Every YAML of every config group composes (and instantiates where it can here); bad input
stops the run before any work with one line naming the key."""

from __future__ import annotations

import dataclasses
import math
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from advarch.config.compose import compose_run
from advarch.errors import ConfigError
from advarch.models.registry import BLOCKS
from advarch.pipeline import instantiate_dict, validate_run
from advarch.train import run
from tests.conftest import ROOT, SMALL_TEXT

CONFIGS = ROOT / "advarch" / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


MULTI_GATE = ("mmoe", "shared_bottom", "one_gate_moe")  # tabular MMoE family, already tiny
STDLIB = sysconfig.get_paths()["stdlib"]
RETRO_SMALL = ["data.retrieval.chunk_size=16", "data.retrieval.embedder_dim=64"]
# Sequence models on the synthetic sequence data, so every data option of theirs trains once.
SEQUENCE_DATA = {
    "moe": ["data=associative_recall"],
    "soft_moe": ["data=selective_copying"],
    "ssm": ["data=selective_copying"],
    "hybrid": ["data=associative_recall"],
}
FEW_STEPS = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]


def overrides_for(model: str) -> list[str]:
    """Data (and size) overrides a model config fits; language models get the small corpus."""
    if model in MULTI_GATE:
        return ["debug=tiny", "data=mmoe_synthetic"]  # tiny already: the sizes do not apply
    if model.startswith("seq2seq"):
        return ["debug=tiny", "data=seq2seq_reverse"]
    if model.startswith("retro"):
        return ["debug=tiny", "data=text_retrieval", *SMALL_TEXT, *RETRO_SMALL]
    return ["debug=tiny", *SEQUENCE_DATA.get(model, SMALL_TEXT)]


def trained_run(make_cfg, overrides: list[str]) -> tuple[dict[str, float], Path]:
    """Train and test `overrides` end to end; the metrics and the run folder."""
    cfg = make_cfg(overrides)
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    finite = [v for k, v in metrics.items() if k.startswith("test/")]
    assert finite and all(math.isfinite(v) for v in finite)
    return metrics, out


@pytest.mark.parametrize("model", options("model"))
def test_every_block_section_of_a_model_config_has_every_option(make_cfg, model: str) -> None:
    """`model.<block>.<option>=…` works on every model that has the block (`model=retro_moe`
    listed 2 of the 11 MoE options: `model.moe.capacity_factor=1.25` was "not a key", and a
    retrofit of a `model=moe` base was refused over the absent `num_shared_experts`)."""
    cfg = make_cfg([f"model={model}"]).model
    for name, block in BLOCKS.items():
        if name in cfg and cfg[name] is not None and block.config.name:
            fields = {f.name for f in dataclasses.fields(block.config)}
            assert set(cfg[name]) == fields, f"model={model}: model.{name}"


@pytest.mark.parametrize(
    ("model", "block", "source"),
    [("retro_moe", "retro", "retro"), ("hybrid", "ssm", "ssm"), ("hybrid", "swa", "longformer")],
)
def test_a_block_section_copied_from_its_model_config_holds_its_values(
    make_cfg, model: str, block: str, source: str
) -> None:  # fmt: skip
    assert make_cfg([f"model={model}"]).model[block] == make_cfg([f"model={source}"]).model[block]


@pytest.mark.parametrize("model", options("model"))
def test_every_model_config_trains_on_data_it_fits(make_cfg, model: str) -> None:
    metrics, _ = trained_run(make_cfg, [f"model={model}", *overrides_for(model), *FEW_STEPS])
    assert metrics["train/loss"] > 0


def test_debug_tiny_shrinks_the_sizes_each_model_has(make_cfg) -> None:
    sequence = make_cfg(["debug=tiny", "model=moe"]).model
    assert (sequence.dim, sequence.depth, sequence.num_heads, sequence.ffn_hidden) == (32, 2, 2, 64)
    assert make_cfg(["debug=tiny", "model=moe", "model.dim=48"]).model.dim == 48  # typed wins
    # a layer of every block of a longer pattern: hybrid's [ssm,attn,ssm,swa] (depth 2 ran no swa)
    assert make_cfg(["debug=tiny", "model=hybrid"]).model.depth == 4
    assert make_cfg(["debug=tiny", "model=hybrid", "model.depth=2"]).model.depth == 2  # typed
    assert make_cfg(["debug=tiny", "model=hybrid", "model.depth=3"]).model.depth == 3
    for model in MULTI_GATE:  # no width or depth of their own: their config as it is
        cfg = make_cfg(["debug=tiny", f"model={model}", "data=mmoe_synthetic"])
        assert cfg.model == make_cfg([f"model={model}", "data=mmoe_synthetic"]).model
        validate_run(cfg)
    # a typed stream length trains that many steps a task (debug=tiny's 3 won, silently)
    stream = ["debug=tiny", "strategy=naive"]
    assert make_cfg(stream).trainer.limit_train_batches == 3
    assert make_cfg([*stream, "data.steps_per_task=25"]).trainer.limit_train_batches == 1.0
    typed = [*stream, "data.steps_per_task=25", "trainer.limit_train_batches=2"]
    assert make_cfg(typed).trainer.limit_train_batches == 2
    # EWC's Fisher from 8 examples, also where an experiment set it (512), unless typed
    fisher = [["strategy=ewc"], ["experiment=ewc_permuted_digits"],
              ["strategy=ewc", "strategy.fisher_samples=32"]]  # fmt: skip
    assert [make_cfg(["debug=tiny", *o]).strategy.fisher_samples for o in fisher] == [8, 8, 32]
    assert make_cfg(["strategy=ewc"]).strategy.fisher_samples == 64


# Options of the other groups, each run once at tiny size; (overrides, files the run promises).
TINY_SIZES = ["model.dim=32", "model.depth=2", "model.num_heads=2", "model.ffn_hidden=64"]
OPTION_RUNS = {
    "logger=csv": (["logger=csv"], ["csv/version_0/metrics.csv"]),
    "logger=wandb": (["logger=wandb"], ["wandb/offline-run-*/run-*.wandb", "wandb_id.txt"]),
    "logger=tensorboard": (["logger=tensorboard"], ["tensorboard/**/events.out.tfevents.*"]),
    "callbacks=with_early_stopping": (["callbacks=with_early_stopping"], []),
    "callbacks=none": (["callbacks=none"], []),
    "trainer=cpu": (["trainer=cpu"], []),
    "debug=limit": (["debug=limit", *TINY_SIZES, *FEW_STEPS], []),
    "debug=overfit": (["debug=overfit", *TINY_SIZES, "trainer.max_steps=3"], []),
    "debug=profiler": (["debug=profiler", *TINY_SIZES, "trainer.max_steps=3"], ["*profile*"]),
    "data=rotated_digits": (
        ["data=rotated_digits", "strategy=naive", "data.num_tasks=2", "data.epochs_per_task=1"],
        ["continual/accuracy_matrix.csv"],
    ),
    "experiment=joint_permuted_digits": (
        ["experiment=joint_permuted_digits", "data.num_tasks=2", "data.epochs_per_task=1"],
        [],
    ),
    "experiment=expert_masks_split_digits": (["experiment=expert_masks_split_digits"], []),
    "experiment=retro_vs_plain": (["experiment=retro_vs_plain", *SMALL_TEXT, *RETRO_SMALL], []),
    "experiment=retro_versions": (  # this interpreter's stdlib stands in for two versions
        ["experiment=retro_versions", *SMALL_TEXT, *RETRO_SMALL, f"data.files='{STDLIB}/*.py'"],
        [],
    ),
}
DIGIT_STREAM = ["++trainer.limit_train_batches=3", "trainer.limit_val_batches=1"]


@pytest.mark.parametrize("name", list(OPTION_RUNS))
def test_every_option_runs_end_to_end(make_cfg, name: str, capsys) -> None:
    overrides, promised = OPTION_RUNS[name]
    base = ["debug=tiny", *SMALL_TEXT] if "debug=" not in " ".join(overrides) else SMALL_TEXT
    if "digits" in name:
        base = ["debug=tiny", *DIGIT_STREAM]
    _, out = trained_run(make_cfg, [*base, *overrides])
    for pattern in promised:
        assert list(out.glob(pattern)), f"{name}: no {pattern} in {out}"
    if name == "debug=profiler":  # (its summary says where: nothing did)
        said = "profile: fit-profile.txt, test-profile.txt in the run folder\n"
        assert said in capsys.readouterr().out
    if name == "debug=overfit":  # (its summary said the held-out loss alone: "NOT below …")
        said = "overfit_batches=4: train/loss "
        assert said in capsys.readouterr().out


def test_every_option_is_run_somewhere() -> None:
    """Options run by other test files are listed here; a new YAML needs a run of its own."""
    elsewhere = {
        "debug": {"tiny", "fdr"},  # every tiny run; test_train
        "trainer": {"default", "ddp_sim", "gpu", "ddp", "fsdp"},  # test_train; GPU: see below
        "callbacks": {  # default (every run) and its parts; early_stopping: with_early_stopping
            "default",
            "early_stopping",
            "expert_load",
            "lr_monitor",
            "model_checkpoint",
            "rich_model_summary",
            "rich_progress_bar",
            "throughput",
        },
        "hparams_search": {"optuna", "ewc_optuna"},  # test_readme, test_sweeps
        "logger": {"many"},  # test_readme: `... logger=many` (its TensorBoard and W&B files)
        "optimizer": {"adamw", "adam", "sgd"},  # every run; strategies/test_optimization
        "scheduler": {"cosine", "linear", "constant"},  # every run; strategies/test_optimization
        "experiment": {
            "ewc_permuted_digits",  # strategies/test_ewc
            "naive_permuted_digits",
            "fewshot_synthetic",  # strategies/test_fewshot
            "fewshot_rotated_digits",
            "pretrain_digits_0_4",  # strategies/test_finetune
            "finetune_new_experts_5_9",
            "mmoe_synthetic",  # strategies/test_multitask
            "merge_digit_tasks",  # tests/demos/test_merge_digits.py
            "selective_copying",  # test_selective_copying
            "selective_copying_lti",
            "gpu_lm",  # test_gpu_lm_experiment_runs, where CUDA exists
            "retro_lookup",  # test_readme: `python train.py experiment=retro_lookup`
        },
    }
    ran = {tuple(name.split("=")) for name in OPTION_RUNS}
    groups = ("logger", "callbacks", "debug", "trainer", "experiment", "hparams_search")
    for group in (*groups, "optimizer", "scheduler"):
        missing = (
            set(options(group)) - elsewhere.get(group, set()) - {o for g, o in ran if g == group}
        )
        assert not missing, f"{group} options never run: {sorted(missing)}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp"])
def test_gpu_trainers_run(make_cfg, trainer: str) -> None:
    trained_run(make_cfg, ["debug=tiny", *SMALL_TEXT, f"trainer={trainer}", "trainer.devices=1"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_lm_experiment_runs(make_cfg) -> None:
    trained_run(make_cfg, ["experiment=gpu_lm", "debug=tiny", *SMALL_TEXT])


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
    (["optimizer.lr=-1"], r"optimizer\.lr=-1 must be a positive number"),
    (["optimizer.lr=fast"], r"optimizer\.lr='fast' must be a positive number"),
    (["scheduler.warmup_steps=fast"], r"scheduler\.warmup_steps='fast' has the wrong type"),
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
    with pytest.raises(ConfigError, match="model/nope"):
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


def test_checkpoint_names_are_the_readmes(make_cfg) -> None:
    # the README: best-<step>.ckpt, but epoch-<n>.ckpt for the digit task streams it names
    epochs = {"naive_permuted_digits", "ewc_permuted_digits", "joint_permuted_digits",
              "expert_masks_split_digits"}  # fmt: skip
    for experiment in options("experiment"):
        checkpoint = make_cfg([f"experiment={experiment}"]).callbacks.model_checkpoint
        want = "epoch-{epoch}" if experiment in epochs else "best-{step}"
        assert checkpoint.filename == want, experiment
        assert (checkpoint.every_n_epochs == 1) == (experiment in epochs), experiment


@pytest.mark.parametrize("name", options("strategy"))
def test_a_strategy_configs_values_are_its_classs_defaults(make_cfg, name: str) -> None:
    """Building a strategy in Python (as the README invites) gives the documented defaults
    (review 42: EWCStrategy's λ was 100, its config's 10⁴). A config that derives from
    another of the same class (retrofit: finetune's) sets its own values on purpose."""
    import importlib
    import inspect

    own = yaml.safe_load((CONFIGS / "strategy" / f"{name}.yaml").read_text())
    values = OmegaConf.to_container(make_cfg([f"strategy={name}"]).strategy, resolve=True)
    module, _, cls = values["_target_"].rpartition(".")
    target = getattr(importlib.import_module(module), cls)
    parents = [p for p in own.get("defaults", []) if isinstance(p, str) and p != "_self_"]
    if any(yaml.safe_load((CONFIGS / "strategy" / f"{p}.yaml").read_text()).get("_target_")
           == values["_target_"] for p in parents):  # fmt: skip
        pytest.skip(f"strategy={name} is a variant of {parents[0]}'s class")
    defaults = {
        p.name: p.default
        for c in reversed(target.__mro__) if "__init__" in vars(c)
        for p in inspect.signature(c.__init__).parameters.values()
        if p.default is not inspect.Parameter.empty
    }  # fmt: skip
    tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    differ = {k: (v, defaults[k]) for k, v in tuples.items() if k in defaults and v != defaults[k]}
    assert not differ, f"config vs {cls} default: {differ}"
