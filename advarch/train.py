"""Training entry point: compose → validate → build → fit → test → summarise.

`run(cfg)` does the work and returns the metrics; `main` is the Hydra wrapper (the
`advarch-train` console script and `train.py` at the repository root call it).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import advarch.config.resolvers  # noqa: F401  (registers ${unique:})
from advarch.config.combinations import check_combination, with_strategy_defaults
from advarch.config.validate import import_from_working_dir
from advarch.errors import WRITE_ERRORS
from advarch.output_folders import check_writable, discard_run_folder
from advarch.reasons import first_line
from advarch.slurm import requeue
from advarch.stop_signals import (
    HELD,
    PHASE,
    Stopped,
    hold_between_trials,
    launcher_gone,
    requested_stop,
    signals_held,
    stop_on_signals,
    stop_request_file,
    stopped_line,
    training_started,
    trial_running,
)
from advarch.tracking import RunIdentity, finish_wandb, tracker_group

log = logging.getLogger("advarch")


def run(
    cfg: DictConfig, identity: RunIdentity | None = None, earlier_trials: Sequence[Path] = ()
) -> dict[str, float]:
    """Train and test one configuration; returns the final metrics (floats).

    `identity` places the run among others on the tracker (default: a single run named
    `cfg.run_name`); a sweep trial's `earlier_trials` are the folders of the same trial in
    interrupted sweeps, where `ckpt_path=auto` looks too.
    """
    check_combination(cfg)  # impossible combinations stop here: no torch, no data, no tree
    check_writable(Path(cfg.paths.cache_dir), "paths.cache_dir", keep=False)  # (its data's)
    PHASE["training_started"] = False
    from advarch.run_lock import run_folder_lock

    sweep = identity is not None and identity.job_type == "sweep"
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"  # (where to choose another folder)
    with run_folder_lock(Path(cfg.paths.output_dir), key):
        return _run(cfg, identity, earlier_trials)


def _run(cfg: DictConfig, identity: RunIdentity | None, earlier_trials: Sequence[Path]
         ) -> dict[str, float]:  # fmt: skip
    """`run`'s work, in its locked run folder."""
    import lightning as L
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.utilities import rank_zero_only

    from advarch.atomic import remove_abandoned_writes, write_text_atomic
    from advarch.callbacks.checkpoint_io import AtomicCheckpointIO
    from advarch.callbacks.final_validation import ValidateAtLastStep
    from advarch.callbacks.run_config import LogRunConfig
    from advarch.callbacks.signals import Interrupted
    from advarch.config.runs import (
        WANDB_ID_FILE,
        check_base_fits,
        check_tokenizer_keys,
        evaluation_change,
        resolve_checkpoint,
        schedule_change,
        use_resumed_tokenizer,
    )
    from advarch.console_log import NamesItsRun, quiet_lightning_logs, say
    from advarch.console_summary import print_config_tree, print_summary, save_summary
    from advarch.ddp_launcher import StopForwardingLauncher, forward_stop_signals
    from advarch.errors import ConfigError
    from advarch.pipeline import (
        batch_limit_error,
        build_all,
        check_batch_fractions,
        check_monitors,
        instantiate_checked,
        instantiate_dict,
        validate_run,
    )
    from advarch.run_lock import earlier_run_file
    from advarch.spec import ConfiguresTrainer
    from advarch.strategies.base import BaseStrategy
    from advarch.tracking import sync_hint, tracker_config

    quiet_lightning_logs()
    validate_run(cfg)  # every key, before any work
    data_before = OmegaConf.to_container(cfg.data) if cfg.get("data") is not None else None
    check_base_fits(cfg)  # a fine-tune's base of other model sizes (its tokenizer taken)
    check_tokenizer_keys(cfg)
    output_dir = Path(cfg.paths.output_dir)
    sweep = identity is not None and identity.job_type == "sweep"
    runs_dir = None if sweep else Path(cfg.paths.runs_dir)  # (a trial: its earlier trials')
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), runs_dir, cfg, output_dir, earlier_trials)
    use_resumed_tokenizer(cfg, ckpt)
    if cfg.get("data") is not None and OmegaConf.to_container(cfg.data) != data_before:
        _record_config(cfg)  # (the tokenizer a base or a resume lent)
    auto_fresh = ckpt is None and cfg.get("ckpt_path") == "auto"
    other_run = earlier_run_file(output_dir) if auto_fresh else None
    if other_run is not None:  # (none of this configuration there: `check_new_folder` let it)
        raise ConfigError(
            f"{output_dir} holds another run ({other_run.relative_to(output_dir)}) and "
            "ckpt_path=auto found no checkpoint of this configuration: a fresh run there would "
            "add to its CSV and checkpoints; give it an empty folder"
        )
    last = output_dir / "checkpoints" / "last.ckpt"
    remove_abandoned_writes(last.parent)  # (a checkpoint's half, of a run killed mid-write)
    final_validation = ValidateAtLastStep()  # the final weights compete for best-*.ckpt
    changes = [] if ckpt is None else [schedule_change(ckpt, cfg), evaluation_change(ckpt, cfg)]
    callbacks = [
        *instantiate_dict(cfg.get("callbacks"), "callbacks"),
        *run_callbacks(cfg, ckpt, output_dir, [c for c in changes if c]),
        final_validation,
    ]
    output_dir.mkdir(parents=True, exist_ok=True)
    echo = cfg.get("extras", {}).get("print_config", True) and rank_zero_only.rank == 0
    print_config_tree(cfg, output_dir / "config_tree.txt", echo=echo)  # the file always
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    datamodule, spec, module = build_all(cfg)  # ConfigError on bad input, before any work
    check_monitors(cfg, module)
    check_batch_fractions(cfg, datamodule)

    config = tracker_config(cfg, module.parameter_counts())
    loggers = build_loggers(cfg, identity or RunIdentity(cfg.run_name), config, ckpt)
    if not loggers:  # `~logger`: the learning-rate monitor refuses a Trainer without loggers
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(LogRunConfig(config))
    run_label = identity.label if identity else None
    for callback in callbacks:
        if isinstance(callback, NamesItsRun):
            callback.run_label = run_label
    # datamodules whose train loader changes with the epoch (continual streams, curricula)
    overrides = datamodule.trainer_overrides if isinstance(datamodule, ConfiguresTrainer) else {}
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):  # (`callbacks=none`)
        # no Lightning default checkpointing into the logger's folder: last.ckpt is written below
        overrides = {**overrides, "enable_checkpointing": False}
    if cfg.model.get("compile") is True and "inference_mode" not in cfg.trainer:
        # testing under no_grad, as fit's validations run, reuses their compiled graph:
        # inference mode (Lightning's default for test) would compile the model a third time
        overrides = {**overrides, "inference_mode": False}
    trainer: L.Trainer = instantiate_checked(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()],
        **overrides,
    )
    forward_stop_signals(trainer)  # DDP worker processes stop when this process is told to
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger" and rank_zero_only.rank == 0:
            write_text_atomic(output_dir / WANDB_ID_FILE, logger.experiment.id)
    metrics: dict[str, float] = {}
    try:
        if cfg.get("train", True):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
            finished = 0 < trainer.max_steps <= trainer.global_step
            if ckpt and finished and not final_validation.trained:
                log.info("%s already reached trainer.max_steps=%d (step %d): nothing left to "
                         "train; raise trainer.max_steps to train on. Validating and testing it "
                         "as it is", ckpt, trainer.max_steps, trainer.global_step)  # fmt: skip
            # the final state, whatever the checkpoint cadence; not from the parent of spawned
            # DDP workers (ddp_spawn): it holds their weights but not their loop state (step 0)
            if not isinstance(trainer.strategy.launcher, StopForwardingLauncher):
                trainer.save_checkpoint(last)
            metrics.update(scalar_metrics(trainer))
            validated = isinstance(module, BaseStrategy) and (
                module.validated_at_step == trainer.global_step
            )
            if not validated and not trainer.fast_dev_run:
                # the last validation predates the final weights: validate them
                trainer.validate(module, datamodule=datamodule, verbose=False)
                metrics.update(scalar_metrics(trainer))  # (validate resets the others)
        if cfg.get("test", True):
            results = trainer.test(module, datamodule=datamodule, verbose=False)
            metrics.update({k: float(v) for r in results for k, v in r.items()})
    except MisconfigurationException as err:  # (Lightning's, of a fraction of no batch)
        if (named := batch_limit_error(err, "trainer.")) is None:
            raise
        raise named from err
    except Interrupted:  # (its line was printed where it stopped)
        to_wandb = any(type(logger).__name__ == "WandbLogger" for logger in loggers)
        hint = sync_hint(output_dir) if to_wandb else None  # the part trained is worth a look
        if hint and trainer.is_global_zero:
            say(hint)
        raise
    finally:
        finish_wandb()
    if trainer.is_global_zero:  # other DDP ranks ran the same job silently
        print_summary(cfg, spec, metrics, output_dir, run_label)
        save_summary(spec, metrics, output_dir)
    return metrics


def run_callbacks(
    cfg: DictConfig, ckpt: Path | None, output_dir: Path, changes: Sequence[str] = ()
) -> list[Any]:
    """The callbacks every run has beside the config's: signals save `last.ckpt`, the data's
    identity is checked on resume (then `changes`, what its other options change, are said),
    a resume draws on from the saved random states, spawned
    DDP workers print and exit as this process does, a resume's curves start at step 0, and a
    stop outside training says what it saved."""
    from lightning.pytorch.callbacks import LambdaCallback

    from advarch.callbacks.data_identity import DataIdentity
    from advarch.callbacks.known_warnings import IgnoreKnownWarnings
    from advarch.callbacks.process_group import DestroyProcessGroupAtExit
    from advarch.callbacks.random_state import RandomStateCheckpoint
    from advarch.callbacks.resumed_curves import ResumedCurves
    from advarch.callbacks.signals import SignalCheckpoint
    from advarch.callbacks.skipped_fit import QuietSkippedFit
    from advarch.callbacks.worker_console import WorkerConsole

    resumed = None if ckpt is None else str(ckpt)  # no resume on other data; then "resuming"
    return [
        SignalCheckpoint(output_dir / "checkpoints" / "last.ckpt", parallel_stop_file()),
        DataIdentity(resumed, auto=cfg.get("ckpt_path") == "auto", changes=changes),
        RandomStateCheckpoint(),  # a resume draws the dropout masks the run would have drawn
        WorkerConsole(),  # spawned DDP workers' console as this one's
        IgnoreKnownWarnings(),  # again in spawned DDP workers
        DestroyProcessGroupAtExit(),  # gloo's workers abort at exit without it
        ResumedCurves(ckpt, output_dir),  # a resume's CSV curves from step 0
        QuietSkippedFit(),  # a finished checkpoint: advarch's line alone
        # a stop signal outside `SignalCheckpoint`'s handlers comes before training or after
        LambdaCallback(on_train_start=training_started),
    ]


def build_loggers(
    cfg: DictConfig, identity: RunIdentity, config: dict[str, Any], ckpt: Path | None
) -> list[Any]:
    """The configured loggers; W&B gets the run's identity, `config` (its `tracker_config`)
    and resume id (the others get `config` from `LogRunConfig`)."""
    from lightning.pytorch.utilities import rank_zero_only

    from advarch.config.resolvers import metric_mode
    from advarch.config.runs import previous_wandb_id
    from advarch.pipeline import instantiate_checked
    from advarch.tracking import define_summary, wandb_init_fields

    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None or "_target_" not in node:
            continue
        if name != "wandb":
            loggers.append(instantiate_checked(node, f"logger.{name}"))
            continue
        fields = wandb_init_fields(cfg, identity, config)
        fields["id"] = previous_wandb_id(ckpt) or node.get("id")
        fields["tags"] = list(dict.fromkeys([*map(str, node.get("tags") or []), *fields["tags"]]))
        logger = hydra.utils.instantiate(node, _partial_=True, _convert_="all")(**fields)
        metric = cfg.get("optimized_metric")
        mode = OmegaConf.select(cfg, "callbacks.model_checkpoint.mode") or metric_mode(metric)
        if rank_zero_only.rank == 0:  # other ranks hold a dummy experiment
            define_summary(logger.experiment, metric, mode)
        loggers.append(logger)
    return loggers


def scalar_metrics(trainer: Any) -> dict[str, float]:
    """The trainer's current scalar callback metrics as floats."""
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _discard_run_folder(cfg: DictConfig) -> None:
    """`discard_run_folder` of this run's folder, with its empty parents inside paths.root_dir."""
    discard_run_folder(Path(cfg.paths.output_dir), Path(cfg.paths.root_dir))


def main() -> None:
    """The command line: config folders and group choices checked (`check_config_dirs`,
    `check_group_choices`), the strategy's default data and optimisation added
    (`with_strategy_defaults`), keys checked (`check_override_keys`), then Hydra."""
    from advarch.config.choices import (
        check_config_dirs,
        check_group_choices,
        check_launcher_at_hand,
        check_override_keys,
        check_override_syntax,
        check_single_run,
    )
    from advarch.errors import ConfigError
    from advarch.output_folders import remember_record
    from advarch.run_lock import check_new_folder, process_rank, typed_run_folder

    stop_on_signals()  # (a Ctrl-C while the command line is checked: the one line below)
    try:
        try:
            check_config_dirs(sys.argv[1:])  # before its options are called unknown
            check_override_syntax(sys.argv[1:])  # `run_name=a(b)` quoted, not Hydra's error
            check_group_choices(sys.argv[1:])  # a misspelt `model=moee` in one line
            check_single_run(sys.argv[1:])  # `model.depth=2,4` without -m
            check_launcher_at_hand(sys.argv[1:])  # hydra/launcher=slurm off a cluster
            sys.argv[1:] = with_strategy_defaults(sys.argv[1:])
            check_override_keys(sys.argv[1:])  # and `model.dimm=64`
            check_new_folder(sys.argv[1:])  # not into a folder holding another run
        except ConfigError as err:
            sys.exit(f"error: {err}")
        if (folder := typed_run_folder(sys.argv[1:])) is not None and process_rank() == 0:
            remember_record(folder)  # (a refused resume there puts back the run's .hydra/)
        import_from_working_dir()
        # before Hydra builds a sweeper: Optuna's storage announces alembic's plugins at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
        hydra_main()
        ended_as_held = list(HELD)
    except (KeyboardInterrupt, Stopped) as err:  # outside training's handlers (imports, data)
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        if process_rank() == 0:  # (every process of a DDP job gets the signal)
            from advarch.sweeps import RUNNING_SWEEP, show_running_sweep

            # (a config may ask for the sweep: hparams_search=… sets hydra.mode=MULTIRUN)
            sweep = bool(RUNNING_SWEEP) or any(a in ("-m", "--multirun") for a in sys.argv[1:])
            if sweep:
                show_running_sweep()  # the trials so far
            print(stopped_line(signum, sweep), file=sys.stderr)
            requeue(signum)
        sys.exit(128 + signum)
    finally:
        hold_between_trials(False)  # (a process may go on: tests, notebooks)
    if ended_as_held:  # as the sweep's table was written: every trial ran
        name = signal.Signals(ended_as_held[0]).name
        print(f"{name} received as the sweep ended: its trials all ran", file=sys.stderr)


@hydra.main(version_base="1.3", config_path="pkg://advarch.configs", config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns `cfg.optimized_metric` for sweepers.

    A single run turns bad input and divergence into one `error: …` line. In a multirun a
    failed trial (any exception, or a non-finite metric) logs one line with its overrides,
    keeps its traceback in `<trial>/error.txt`, and returns the worst value, so the sweep goes
    on and the sweeper ranks it last; `advarch.sweeps.SweepSummary` tabulates the trials.
    """
    stop_file = parallel_stop_file()  # (its workers hold signals between trials)
    try:
        with trial_running():  # (a signal held since the last trial stops the sweep here)
            if requested_stop(stop_file) is None and not launcher_gone():
                return _job(cfg)  # (else its parallel sweep stops: not begun)
    except (KeyboardInterrupt, Stopped):  # outside training's handlers (imports, data)
        if stop_file is None:  # (a parallel trial returns: its launcher stops the sweep)
            _discard_run_folder(cfg)  # (a folder with checkpoints stays)
            raise
    finally:
        if launcher_gone():  # (its trial recorded: nothing waits for this worker)
            os._exit(128 + signal.SIGTERM)
    _discard_run_folder(cfg)
    return None


def parallel_stop_file() -> Path | None:
    """In a trial of a parallel sweep (`hydra/launcher=local_parallel`), the file through which
    its launcher asks the trials to stop (`hydra_plugins.advarch_launcher`); else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    if not str(OmegaConf.select(hc, "launcher._target_")).endswith(".LocalParallelLauncher"):
        return None
    return stop_request_file(Path(hc.runtime.cwd, hc.sweep.dir))  # (hydra.job.chdir=true)


def _job(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from advarch.checkpoint import CheckpointError, checkpoint_file
    from advarch.config.compose import apply_debug_sizes
    from advarch.errors import ConfigError

    if apply_debug_sizes(cfg, HydraConfig.get().overrides.task):
        _record_config(cfg)  # (Hydra recorded the model of the sizes before)
    identity = run_identity(cfg)
    if identity.job_type != "sweep":  # (a trial reports its own failure; the sweep goes on)
        try:  # before torch is imported: an impossible run or a mistyped path stops at once
            check_combination(cfg)
            check_writable(Path(cfg.paths.cache_dir), "paths.cache_dir", keep=False)
            if cfg.get("ckpt_path") not in (None, "auto"):
                checkpoint_file(cfg.ckpt_path, "ckpt_path", words=("auto",))
        except (ConfigError, CheckpointError) as err:
            _discard_run_folder(cfg)
            sys.exit(f"error: {err}")
    with signals_held():  # torch's imports run Python inside C++, where a raise would abort
        from advarch.callbacks.signals import Interrupted  # (Lightning and torch with it)
        from advarch.run_lock import FolderInUse

    try:
        if identity.job_type == "sweep":
            return _trial(cfg, identity)
        return _optimized_value(cfg, run(cfg, identity))
    except Interrupted as err:
        finish_wandb()
        sys.exit(err.exit_code)  # the checkpoint line was printed when it was saved
    except (ConfigError, CheckpointError, FloatingPointError) as err:
        if not isinstance(err, FloatingPointError | FolderInUse):  # (another run's folder)
            _discard_run_folder(cfg)
        sys.exit(f"error: {err}")
    except OSError as err:  # a full or read-only disk, a folder without write permission
        if err.errno not in WRITE_ERRORS:
            raise
        finish_wandb()
        where = err.filename or cfg.paths.output_dir
        _discard_run_folder(cfg)  # (one that holds checkpoints stays)
        saved = sorted(Path(cfg.paths.output_dir).glob("checkpoints/*.ckpt"))
        kept = f"{saved[-1].parent} keeps its complete checkpoints" if saved else "nothing saved"
        sys.exit(f"error: cannot write {where}: {err.strerror} ({kept}; free space, allow "
                 "writing, or choose paths.cache_dir / hydra.run.dir elsewhere)")  # fmt: skip


def _record_config(cfg: DictConfig) -> None:
    """Write `cfg` over the job's `.hydra/config.yaml`, as Hydra writes it: the config the run
    trains."""
    from hydra.core.hydra_config import HydraConfig

    from advarch.atomic import write_text_atomic

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    if hc is None or OmegaConf.is_missing(hc.runtime, "output_dir"):
        return  # (`run(cfg)` of a config composed in code: no job folder)
    if hc.output_subdir is not None:  # (none in DDP's other processes)
        folder = Path(hc.runtime.output_dir) / hc.output_subdir
        write_text_atomic(folder / "config.yaml", OmegaConf.to_yaml(cfg))


def _trial(cfg: DictConfig, identity: RunIdentity) -> float:
    """One multirun job: never raises, records `result.json` for the sweep table."""
    import traceback

    from hydra.core.hydra_config import HydraConfig

    from advarch.callbacks.signals import Interrupted
    from advarch.config.resolvers import sweep_direction
    from advarch.run_lock import FolderInUse
    from advarch.sweeps import (
        RESUME_SWEEP,
        earlier_trials,
        show_summary,
        worst_value,
        write_result,
    )

    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    overrides = identity.trial.split()
    metric = cfg.get("optimized_metric")
    direction = str(OmegaConf.select(hc, "sweeper.direction") or sweep_direction(metric))
    earlier: list[Path] = []
    if cfg.get("ckpt_path") == "auto":  # a rerun of an interrupted sweep: each trial goes on
        earlier = earlier_trials(Path(hc.sweep.dir).resolve(), list(hc.overrides.task))
    try:
        metrics = run(cfg, identity, earlier)
        value = _optimized_value(cfg, metrics)
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(f"optimized_metric={metric} is {value}")
    except Interrupted as err:  # a signal ends the whole sweep (its checkpoint is saved)
        where = str(err).split("; resume")[0]  # (a trial resumes with the sweep, not alone)
        write_result(output_dir, overrides, metric, None, {}, where, status="interrupted")
        if parallel_stop_file() is not None:  # its launcher stops the sweep, with the table
            finish_wandb()
            return worst_value(direction)
        show_summary(Path(hc.sweep.dir), metric, direction)
        print(f"sweep stopped: {RESUME_SWEEP} (finished trials are kept, this one resumes)")
        raise
    except FolderInUse as err:  # another run's folder: nothing written into it
        log.error("trial %s failed: %s", identity.trial or hc.job.num, err)
        return worst_value(direction)
    except Exception as err:  # noqa: BLE001  (a trial's failure must not end the sweep)
        reason = first_line(err)
        log.error("trial %s failed: %s", identity.trial or hc.job.num, reason)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "error.txt").write_text(traceback.format_exc())
        write_result(output_dir, overrides, metric, None, {}, error=reason)
        finish_wandb()
        return worst_value(direction)
    write_result(output_dir, overrides, metric, value, metrics)
    return value


def run_identity(cfg: DictConfig) -> RunIdentity:
    """The run's place among others, read from Hydra's runtime config (the edge)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from advarch.sweeps import sweep_overrides, trial_overrides

    hc = HydraConfig.get()
    choices = {k: str(v) for k, v in hc.runtime.choices.items() if v is not None}
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hc.sweep.dir)
        trial = trial_overrides(list(hc.overrides.task), sweep_overrides(sweep_dir))
        group = tracker_group(cfg.run_name, sweep=sweep_dir.name)
        return RunIdentity(cfg.run_name, "sweep", group, " ".join(trial), choices, hc.job.num)
    group = tracker_group(cfg.run_name, choices.get("experiment"))
    return RunIdentity(cfg.run_name, "train", group, "", choices)


def _optimized_value(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    if metric not in metrics:
        split = str(metric).split("/")[0]
        if split == "val" and OmegaConf.select(cfg, "trainer.limit_val_batches") == 0:
            why = "trainer.limit_val_batches=0 validates nothing"
        elif split == "test" and cfg.get("test") is False:
            why = "test=false tests nothing"
        else:
            why = f"known: {', '.join(sorted(metrics))}"
        log.warning("optimized_metric=%s was not logged: %s", metric, why)
        return math.nan
    return metrics[metric]


if __name__ == "__main__":
    main()
