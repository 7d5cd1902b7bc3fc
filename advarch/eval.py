"""Evaluate a checkpoint on a datamodule's test split: `python eval.py ckpt_path=<ckpt> [data=…]`.

The checkpoint carries its resolved training config; the model and strategy are rebuilt from
it, `data=` (optional) swaps in another compatible datamodule, and `data.<key>=…` without it
changes the checkpoint's own data (e.g. `data.max_eval_sequences=null`: the whole test split),
as `strategy.<key>=…` does its strategy (e.g. `strategy.adaptation=none`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import hydra
from omegaconf import DictConfig, OmegaConf

import advarch.config.resolvers  # noqa: F401
from advarch.console_log import quiet_lightning_logs
from advarch.errors import ConfigError
from advarch.spec import kind_name
from advarch.stop_signals import Stopped, signals_held, stopping_in_one_line

log = logging.getLogger("advarch")


class Evaluation(NamedTuple):
    """A checkpoint's test metrics (a task stream's per task as well: `test/task_<j>/…`), the
    names of the data's tasks and the config it was tested with (the run's, as changed)."""

    metrics: dict[str, float]
    task_names: tuple[str, ...]
    config: DictConfig | None = None


def evaluate(cfg: DictConfig) -> Evaluation:
    """Rebuild the run from the checkpoint's config, load its weights, and test.

    The run's own test-batch limit applies (unless `limit_test_batches` is given), so
    evaluating a checkpoint repeats its test exactly.
    """
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from advarch.callbacks.data_identity import data_changed
    from advarch.callbacks.signals import SignalCheckpoint
    from advarch.checkpoint import (
        check_finite,
        load_error,
        load_with_config,
        ran_with,
        with_cache_dir,
    )
    from advarch.config.checks import check_accelerator, check_batch_limit
    from advarch.pipeline import batch_limit_error, build_all

    check_accelerator(cfg.accelerator, "accelerator", "accelerator=cpu")
    limit = cfg.get("limit_test_batches")
    check_batch_limit(limit, "limit_test_batches")
    if limit == 0:
        raise ConfigError("limit_test_batches=0 tests nothing: give a count or a fraction, or "
                          "leave it out (the run's own)")  # fmt: skip
    if not isinstance(cfg.get("wandb"), bool | None):  # (1 == True: `in` would take 1)
        raise ConfigError(f"wandb={cfg.wandb!r} must be true, false or null (as the run)")
    ckpt, saved = load_with_config(cfg.ckpt_path)
    log_to_wandb = cfg.get("wandb")
    if log_to_wandb is None:  # as the run: a debug=* run logged no W&B run, nor does its eval
        log_to_wandb = OmegaConf.select(saved, "logger.wandb") is not None
    if cfg.get("data") is not None:
        saved.data = cfg.data
    elif cfg.get("data_overrides"):
        saved.data = _changed(saved.data, cfg.data_overrides, "data")
    saved = with_cache_dir(saved, cfg.paths.cache_dir)
    learnt_from = set(cfg.get("data_overrides") or {}) & set(TOKENIZER_SOURCE)
    if cfg.get("data") is not None or learnt_from:  # (its own data: `load_with_config`)
        saved.data = with_tokenizer_of(saved.data, ckpt, cfg.ckpt_path)
    if cfg.get("strategy_overrides"):
        saved.strategy = _changed(saved.strategy, cfg.strategy_overrides, "strategy")
    saved.strategy.pop("pretrained", None)  # weights come from the checkpoint itself
    if cfg.get("data") is not None:
        check_data_kind(cfg.ckpt_path, ckpt, saved)
    L.seed_everything(saved.seed, workers=True)
    try:
        datamodule, spec, module = build_all(saved)
    except ConfigError as err:  # (its own files gone: say where to point it)
        moved = (
            cfg.get("data") is None
            and str(err).startswith("data.files")
            and "matches no" in str(err)
        )
        if not moved:
            raise
        raise ConfigError(f"{err}; the run read its text there: give data.files=<where the files "
                          "are now>, or data=<other data>") from err  # fmt: skip
    try:
        module.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        typed = "data=" if cfg.get("data") is not None else "the data.* overrides"
        own = ""
        if cfg.get("data") is not None or cfg.get("data_overrides"):  # (its own data fits it)
            run = ran_with(Path(cfg.ckpt_path))
            own = f"; this data sizes the model otherwise than its run's{run}: leave {typed} out"
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path!r} does not fit this data/model: {load_error(err)}{own}"
        ) from err
    check_finite(module, f"ckpt_path={cfg.ckpt_path!r}")
    module.on_load_checkpoint(ckpt)
    use_runs_unigram(module, ckpt)
    trainer = L.Trainer(
        limit_test_batches=limit or runs_test_limit(saved, ckpt),
        precision=evaluated_precision(saved.trainer.get("precision")),  # and numerics
        logger=eval_wandb_logger(cfg, saved, module, ckpt) if log_to_wandb else False,
        enable_checkpointing=False,
        default_root_dir=cfg.paths.output_dir,
        accelerator=cfg.accelerator,
        devices=1,
        enable_model_summary=False,
        callbacks=[SignalCheckpoint()],  # a signal stops testing with its exit code
    )
    try:
        results = trainer.test(module, datamodule=datamodule, verbose=False)
    except MisconfigurationException as err:  # (Lightning's, of a fraction of no batch)
        if (named := batch_limit_error(err, "")) is None:
            raise
        raise named from err
    own_data = cfg.get("data") is None and not cfg.get("data_overrides")
    changed = data_changed(ckpt, datamodule) if own_data else None
    if changed:  # its own data, rebuilt from files that are not those it trained on
        log.warning("ckpt_path=%s: %s; these metrics are not the run's", cfg.ckpt_path, changed)
    metrics = {k: float(v) for r in results for k, v in r.items()}
    return Evaluation(metrics, spec.task_names, saved)


# data keys that decide what a text datamodule learns its tokenizer from (others, such as
# data.batch_size or data.max_eval_sequences, keep the run's own tokenizer and data cache)
TOKENIZER_SOURCE = (
    "files", "dataset", "text_field", "tokenizer", "bpe_vocab_size", "tokenizer_from",
    "val_fraction", "test_fraction", "max_documents", "seed", "dedupe", "domains",
)  # fmt: skip


def with_tokenizer_of(data: DictConfig, ckpt: dict, ckpt_path: str) -> DictConfig:
    """`data`, where it is text, tokenised with the checkpoint's own tokenizer
    (`data.tokenizer_from`): other files would learn another BPE, whose ids mean other text to
    this model (scores without meaning), or size its embedding otherwise."""
    from omegaconf import open_dict

    from advarch.checkpoint import TOKENIZER
    from advarch.config.typed import typed_overrides
    from advarch.config.validate import takes_option
    from advarch.data.tokenizer import describe_tokenizer

    state = ckpt.get(TOKENIZER)
    if not state or not takes_option(data, "data", "tokenizer_from"):
        return data  # (not text, or a checkpoint from before checkpoints carried tokenizers)
    for key in typed_overrides():
        if key in ("data.tokenizer", "data.bpe_vocab_size", "data.tokenizer_from"):
            raise ConfigError(
                f"{key}: eval.py tokenises text with the checkpoint's own tokenizer "
                f"({describe_tokenizer(state)}), the ids its model learnt; leave {key} out"
            )
    data = data.copy()
    with open_dict(data):
        data.tokenizer_from = str(ckpt_path)
    return data


def use_runs_unigram(module: Any, ckpt: dict) -> None:
    """Score the unigram baseline of the run's training text (its checkpoint's table), not of
    the data read now: `data.domains=[net]` counted net's alone (4.4355 for the run's 4.5602)."""
    import torch

    from advarch.checkpoint import saved_hparam

    saved = ((saved_hparam(ckpt, "spec") or {}).get("extras") or {}).get("unigram_bits")
    objective = getattr(module, "objective", None)
    now = getattr(objective, "unigram_bits", None)
    if saved is not None and now is not None and len(saved) == len(now):
        now.copy_(torch.tensor(saved, dtype=now.dtype))


def runs_test_limit(saved: DictConfig, ckpt: dict) -> int | float:
    """The run's own `trainer.limit_test_batches` on this one process: a count was each of
    the run's DDP processes' (a 2-process `debug=tiny` run tested 4 batches, eval.py 2)."""
    from advarch.strategies.base import WORLD_SIZE

    limit = saved.trainer.get("limit_test_batches") or 1.0
    return limit * int(ckpt.get(WORLD_SIZE) or 1) if isinstance(limit, int) else limit


def check_data_kind(ckpt_path: str, ckpt: dict, saved: DictConfig) -> None:
    """One ConfigError line where `data=` swaps in data of another kind than the checkpoint
    learnt (a classifier on a text corpus): the strategy's own checks spoke of keys the user
    never set (`strategy.fisher_estimator=exact does not apply to language models`)."""
    from hydra.core.hydra_config import HydraConfig

    from advarch.checkpoint import saved_hparam, saved_kind
    from advarch.models.model import head_groups
    from advarch.pipeline import BAD_INPUT, build_datamodule, naming
    from advarch.spec import DataSpec

    learnt = saved_kind(ckpt)
    try:
        _, spec = build_datamodule(saved)
    except BAD_INPUT as err:  # (too few documents for seq_len, …: as build_all says it)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(naming("data", err)) from err
    if learnt and learnt != spec.kind:
        chosen = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        data = chosen.get("data") or saved.data._target_.rsplit(".", 1)[-1]
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} is a {kind_name(learnt)} model and data={data} "
            f"is {kind_name(spec.kind)} data: evaluate it on data of its own kind "
            "(or leave data= out: its own data)"
        )
    learnt_spec = saved_hparam(ckpt, "spec")
    if learnt_spec is None or spec.kind not in ("classification", "regression"):
        return
    heads = saved.model.get("heads", "auto")
    layout, now = ((head_groups(s, heads), s.num_classes) for s in (DataSpec(**learnt_spec), spec))
    if layout != now:  # (a head per task of 2 and one shared of 10 fill 10 outputs alike:
        # read as another's; a domain stream's shared head of 10 digits reads any 10 digits)
        raise ConfigError(
            f"ckpt_path={ckpt_path!r} learnt {heads_text(*layout)} and this data has "
            f"{heads_text(*now)}: its head would be read as another's; evaluate it on data of "
            "its own tasks (or leave data= out)"
        )


def heads_text(groups: int, outputs: int) -> str:
    """`a head of 10 outputs per task for 5 tasks` / `one head of 10 outputs`."""
    return (f"a head of {outputs} outputs per task for {groups} tasks" if groups > 1
            else f"one head of {outputs} outputs")  # fmt: skip


def _changed(saved: DictConfig, changes: DictConfig, group: str) -> DictConfig:
    """The checkpoint's `group` config with `changes` to keys it has (ConfigError otherwise)."""
    from advarch.config.choices import unknown_key

    unknown = sorted(str(k) for k in set(changes) - set(saved))
    if unknown:
        raise unknown_key(group, unknown[0], saved, f"the checkpoint's {group}")
    return OmegaConf.merge(saved, changes)


def checkpoint_overrides(argv: list[str]) -> list[str]:
    """`strategy.<key>=…`, and `data.<key>=…` typed without a `data=` choice, change the
    checkpoint's own strategy and data: Hydra gets them as `+strategy_overrides.<key>=…` and
    `+data_overrides.<key>=…` (eval.yaml has neither group to change; `+data.<key>` made a data
    node without a datamodule), as it does those keys typed without their `+`, and a mapping
    (`data={seq_len: 64}`, as `train.py` takes it) key by key."""
    data_chosen = any(re.match(r"^\+{0,2}data=\s*[^{\s]", a) for a in argv)
    groups = ["strategy"] if data_chosen else ["strategy", "data"]
    argv = [one for a in argv for one in _key_by_key(a, groups)]
    removed = next(
        (a for a in argv if re.match(rf"^~({'|'.join(groups)})(_overrides)?\.", a)), None
    )
    if removed is not None:  # (Hydra's "Could not delete from config" otherwise)
        group = removed[1:].split(".", 1)[0].removesuffix("_overrides")
        raise ConfigError(f"{removed}: eval.py changes the checkpoint's {group} keys "
                          f"({group}.<key>=…) and removes none")  # fmt: skip
    own = re.compile(rf"^\+{{0,2}}({'|'.join(groups)})(_overrides)?\.")
    return [own.sub(r"+\1_overrides.", a) if own.match(a) else a for a in argv]


def _key_by_key(arg: str, groups: list[str]) -> list[str]:
    """`group={a: 1, b: 2}` (or `group_overrides={…}`) of `groups` as `group.a=1 group.b=2`;
    any other argument as it is."""
    from advarch.config.choices import mapping_overrides

    whole = re.match(rf"^\+{{0,2}}({'|'.join(groups)})(?:_overrides)?=(\s*{{.*)$", arg, re.S)
    if whole is None:
        return [arg]
    overrides = mapping_overrides(whole.group(1), whole.group(2))
    if overrides is None:
        raise ConfigError(f"{arg}: not a mapping ({whole.group(1)}.<key>=… sets one key)")
    return overrides


def main() -> None:
    """The command line (`eval.py`, `advarch-eval`): see the module docstring."""
    from advarch.config.choices import check_command_line

    try:
        sys.argv[1:] = checkpoint_overrides(sys.argv[1:])
    except ConfigError as err:
        sys.exit(f"error: {err}")
    check_command_line(sys.argv[1:], "eval")  # a mistyped key in one line
    with stopping_in_one_line("evaluation"):
        hydra_main()


def run_choice_tags(cfg: DictConfig) -> list[str]:
    """`model:…`, `strategy:…`, `data:…` as the training run's W&B run has them (read from its
    folder), the data this evaluation chose where it chose one."""
    from hydra.core.hydra_config import HydraConfig

    from advarch.checkpoint import run_dir_of
    from advarch.reports.run_folders import run_setting

    run_dir = run_dir_of(Path(cfg.ckpt_path))
    here = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    tags = []
    for group in ("model", "strategy", "data"):
        choice = (here.get(group) if group == "data" else None) or run_setting(
            run_dir, f"hydra.runtime.choices.{group}"
        )
        tags += [f"{group}:{choice}"] if choice else []
    return tags


def eval_wandb_logger(cfg: DictConfig, saved: DictConfig, module: Any, ckpt: dict) -> Any:
    """An offline W&B run for this evaluation: job_type `eval`, in the training run's group,
    its config the checkpoint's with `ckpt_path` the evaluated checkpoint, plus what the
    evaluation changed and the optimizer steps the checkpoint had trained (its own step
    counter starts at 0)."""
    import wandb

    from advarch.checkpoint import run_dir_of
    from advarch.reports.run_folders import wandb_group
    from advarch.strategies.base import count_parameters
    from advarch.tracking import tracker_config
    from advarch.wandb_logger import WandbLogger

    config = tracker_config(saved, count_parameters(module.model))
    config["ckpt_path"] = str(cfg.ckpt_path)  # (the run's own says what it resumed from)
    config["eval"] = {
        "data_overridden": cfg.get("data") is not None,
        "trained_steps": int(ckpt.get("global_step", 0)),
    }
    project = OmegaConf.select(saved, "logger.wandb.project") or "advarch"
    return WandbLogger(
        project=project,
        save_dir=cfg.paths.output_dir,
        offline=True,
        name=f"eval {saved.run_name}",
        group=wandb_group(run_dir_of(Path(cfg.ckpt_path).expanduser())) or str(saved.run_name),
        job_type="eval",
        tags=[*(saved.get("tags") or []), *run_choice_tags(cfg), "eval"],
        config=config,
        settings=wandb.Settings(quiet=True, silent=True),
    )


@hydra.main(version_base="1.3", config_path="pkg://advarch.configs", config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    from advarch.checkpoint import CheckpointError, checkpoint_file
    from advarch.config.validate import import_from_working_dir
    from advarch.console_summary import split_table_lines, weighting_lines
    from advarch.output_folders import check_writable, discard_run_folder
    from advarch.tracking import finish_wandb, sync_hint

    import_from_working_dir()
    try:
        if OmegaConf.is_missing(cfg, "ckpt_path"):
            raise ConfigError(
                "ckpt_path is required: eval.py ckpt_path=<run>/checkpoints/last.ckpt"
            )
        checkpoint_file(cfg.ckpt_path, "ckpt_path")  # a mistyped path: said before torch loads
        check_writable(Path(cfg.paths.cache_dir), "paths.cache_dir", keep=False)
        metrics, task_names, tested = _evaluate_until_stopped(cfg)
    except (ConfigError, CheckpointError) as err:
        discard_run_folder()
        sys.exit(f"error: {err}")
    except (KeyboardInterrupt, Stopped):  # before testing (its own stop: `Interrupted`)
        _discard_eval_folder(cfg)
        raise
    finally:
        finish_wandb()
    table = split_table_lines(metrics, "test", task_names)
    print("\n".join(table + weighting_lines(tested, table)))  # (the run summary's lines)
    out = Path(cfg.paths.output_dir) / "metrics.json"
    out.write_text(json.dumps(metrics, indent=2))
    log.info("test metrics written to %s", out)
    hint = sync_hint(Path(cfg.paths.output_dir))
    if hint:
        print(hint)


def _evaluate_until_stopped(cfg: DictConfig) -> Evaluation:
    """`evaluate`; a stop signal ends the command with its exit code (its line is printed)."""
    with signals_held():  # torch's imports run Python inside C++, where a raise would abort
        quiet_lightning_logs()  # (Lightning and torch imported)
        from advarch.callbacks.signals import Interrupted

    try:
        return evaluate(cfg)
    except Interrupted as err:
        _discard_eval_folder(cfg)
        sys.exit(err.exit_code)


def _discard_eval_folder(cfg: DictConfig) -> None:
    """Leave nothing of a stopped evaluation: its W&B run (which logged nothing) and its
    folder."""
    import shutil

    from advarch.output_folders import discard_run_folder
    from advarch.tracking import finish_wandb

    finish_wandb()
    shutil.rmtree(Path(cfg.paths.output_dir) / "wandb", ignore_errors=True)
    discard_run_folder()


if __name__ == "__main__":
    main()


def evaluated_precision(trained: Any) -> str:
    """The run's precision, 16-bit weights (`bf16-true`, which train.py refuses now) as mixed
    precision: running metrics in 16 bits stop counting after ~256 batches."""
    precision = str(trained or "32-true")
    return {"bf16-true": "bf16-mixed", "16-true": "16-mixed"}.get(precision, precision)
