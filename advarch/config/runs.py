"""Finding checkpoints and W&B ids of earlier runs, for `ckpt_path=auto` and resumes."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from advarch.checkpoint import (
    PREFIX,
    CheckpointError,
    newest_readable,
    ran_with,
    read_checkpoint,
    run_dir_of,
    saved_config,
    saved_hparam,
    saved_kind,
)
from advarch.config.typed import typed_overrides
from advarch.errors import ConfigError
from advarch.run_lock import holder
from advarch.spec import kind_name

log = logging.getLogger("advarch")

WANDB_ID_FILE = "wandb_id.txt"
WANDB_ID_FORBIDDEN = ":;,#?/'"  # characters W&B refuses in a run id


RESUME_MUST_MATCH = ("model", "data", "strategy", "optimizer", "scheduler", "seed")  # "this run"
# keys that change no result (`model.compile` renames no weight; `data.tokenizer_from` names
# a file: the tokenizer it holds is in the data's fingerprint, which `DataIdentity` checks)
IRRELEVANT = {"data": ("cache_dir", "num_workers", "tokenizer_from"), "model": ("compile",)}
# keys that change what validation and the test score, not what trains: a resume may change
# them (as `trainer.limit_val_batches`), and says so (`evaluation_change`)
EVALUATION_ONLY = {"data": ("max_eval_sequences",)}


# the keys that tell most, said first: a model's class and its layer pattern before its sizes
FIRST = {"model": ("_target_", "layers", "ffn"), "data": ("_target_",)}


def _differences(
    saved: Any, current: Any, key: str, skip: Mapping[str, Sequence[str]]
) -> str | None:
    """The first `key=value` that differs between two resolved configs (None if none), the
    `FIRST` keys before the others; `skip`: the keys of each section left out."""
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        left_out = skip.get(key, ())
        first = FIRST.get(key, ())
        names = sorted(set(saved) | set(current), key=lambda n: (n not in first, first.index(
            n) if n in first else 0, n))  # fmt: skip
        for name in names:
            if name in left_out:
                continue
            found = _differences(saved.get(name), current.get(name), f"{key}.{name}", skip)
            if found:
                return found
        return None
    return None if saved == current else f"{key}={saved!r} there, {current!r} now"


def with_block_defaults(model: Any) -> Any:
    """A model config whose block sections (`moe`, `ssm`, …) hold every option, the block's
    default where absent (as YAML writes it: a list for a tuple): a config written before its
    YAML listed an option ran with that default, which is no difference."""
    if not isinstance(model, Mapping):
        return model
    from advarch.models.registry import BLOCKS  # (torch: by then imported for the checkpoint)

    filled = dict(model)
    for name, block in BLOCKS.items():
        if block.config.name and isinstance(filled.get(name), Mapping):
            defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                        for f in dataclasses.fields(block.config)}  # fmt: skip
            filled[name] = {**defaults, **filled[name]}
    return filled


def with_trainable_resolved(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A config whose fine-tune `strategy.trainable: null` (the model's output layers) names
    them as globs (`['model.head.*']`): a run from before null was the default saved those."""
    strategy, model = config.get("strategy"), config.get("model")
    if not (isinstance(strategy, Mapping) and "trainable" in strategy
            and strategy["trainable"] is None and isinstance(model, Mapping)):  # fmt: skip
        return config
    from hydra.utils import get_class

    from advarch.models.output import output_layer_globs

    try:
        layers = output_layer_globs(get_class(str(model.get("_target_"))))
    except (ImportError, AttributeError, ValueError):  # (no such class)
        return config
    return dict(config, strategy=dict(strategy, trainable=[PREFIX + g for g in layers]))


def config_mismatch(
    ckpt: Mapping[str, Any],
    cfg: DictConfig,
    keys: Sequence[str] = RESUME_MUST_MATCH,
    resuming: bool = False,
) -> str | None:
    """Why `ckpt` was not written by a run of this configuration (None when it was): the first
    `key=value` of `keys` that differs (`model.ffn=['moe'] there, ['dense'] now`); `resuming`:
    the `EVALUATION_ONLY` keys may differ too (a resume goes on, `evaluation_change` says it)."""
    saved = saved_hparam(ckpt, "cfg")
    if saved is None:
        return "no saved advarch config"
    current = OmegaConf.to_container(cfg, resolve=True)
    saved, current = (dict(with_trainable_resolved(c), model=with_block_defaults(c.get("model")))
                      for c in (saved, current))  # fmt: skip
    kinds = task_kinds(ckpt, saved, current) if "data" in keys else None
    if kinds:
        there, now = (str((c.get("data") or {}).get("_target_")) for c in (saved, current))
        return f"data._target_={there} there, {now} now: {kinds}"
    may_change = EVALUATION_ONLY if resuming else {}
    skip = {g: (*IRRELEVANT.get(g, ()), *may_change.get(g, ())) for g in keys}
    for key in keys:
        found = _differences(saved.get(key), current.get(key), key, skip)
        if found:
            return found
    return None


def task_kinds(ckpt: Mapping[str, Any], saved: Mapping[str, Any], current: Mapping[str, Any]
               ) -> str | None:  # fmt: skip
    """`a classification model, this run language modelling` where the checkpoint learnt
    another kind of task than this run's data serves (None where the same, or unknown)."""
    from advarch.config.combinations import DATA

    def kind(config: Mapping[str, Any]) -> str | None:
        facts = DATA.get(str((config.get("data") or {}).get("_target_")))
        return None if facts is None else facts.kind

    learnt = saved_kind(ckpt) or kind(saved)
    now = kind(current)
    if learnt is None or now is None or learnt == now:
        return None
    return f"a {kind_name(learnt)} model, this run {kind_name(now)}"


# the keys that size an advarch model's tensors: a fine-tune's base must share them
BASE_MUST_MATCH = (
    "model._target_", "model.dim", "model.depth", "model.ffn_hidden", "model.layers",
    "model.ffn", "model.encoder_depth", "model.feature_patch", "model.activation",
    "model.tie_embeddings", "model.moe.num_experts", "model.moe.num_shared_experts",
    "model.moe.shared_hidden", "model.ssm", "data.tokenizer", "data.bpe_vocab_size",
)  # fmt: skip


def check_base_fits(cfg: DictConfig) -> None:
    """A fine-tune's `strategy.pretrained` run must have this run's model sizes: one
    CheckpointError naming the first that differs, before the config tree and any data. A BPE
    base lends its tokenizer first (`take_base_tokenizer`)."""
    pretrained = OmegaConf.select(cfg, "strategy.pretrained")
    if not pretrained:
        return
    ckpt = read_checkpoint(pretrained, "strategy.pretrained", mmap=True)
    base = saved_config(ckpt, pretrained, "strategy.pretrained")
    kinds = task_kinds(ckpt, base, cfg)  # (else its first model key: model.layers=['none'])
    if kinds:
        raise CheckpointError(
            f"strategy.pretrained={pretrained!r} is {kinds}: a fine-tune goes on with its "
            f"base's task, on data of that kind{ran_with(Path(pretrained).expanduser())}"
        )
    take_base_tokenizer(cfg, base, str(pretrained))
    differs = architecture_difference(base, cfg, untied=True)
    if differs:
        key, there, here = differs
        raise CheckpointError(
            f"strategy.pretrained={pretrained!r} was trained with {key}={there}, this run has "
            f"{key}={here}: a fine-tune keeps its base's model sizes"
            f"{ran_with(Path(pretrained).expanduser())}"
        )


def take_base_tokenizer(cfg: DictConfig, base: DictConfig, pretrained: str) -> None:
    """A fine-tune of a BPE run tokenises its data with its base's tokenizer: one learnt anew
    on other files would give ids that mean other text to the base's embedding. Set in place
    (`data.tokenizer_from`, and the base's `data.tokenizer` and `data.bpe_vocab_size` unless
    typed: typed ones must match the base's), so that the run's config says so."""
    data, base_data = cfg.get("data") or {}, base.get("data") or {}
    if base_data.get("tokenizer") != "bpe" or "tokenizer_from" not in data:
        return
    typed = typed_overrides()
    for key in ("tokenizer", "bpe_vocab_size"):
        if f"data.{key}" not in typed:
            data[key] = base_data.get(key)
    if data.tokenizer_from is None:  # (absolute: the run's config is read from other folders)
        data.tokenizer_from = str(Path(pretrained).expanduser().resolve())


def check_tokenizer_keys(cfg: DictConfig) -> None:
    """Typed tokenizer keys that would be ignored, as one ConfigError line: a
    `data.bpe_vocab_size` of a byte-level tokenizer, and a `data.tokenizer` or
    `data.bpe_vocab_size` beside `data.tokenizer_from` (which decides the kind and size)."""
    typed = typed_overrides()
    kind = OmegaConf.select(cfg, "data.tokenizer")
    if not typed.get("data.tokenizer_from") or OmegaConf.select(cfg, "data.tokenizer_from") is None:
        if "data.bpe_vocab_size" in typed and kind not in (None, "bpe"):
            raise ConfigError(
                f"data.bpe_vocab_size={typed['data.bpe_vocab_size']} sizes a BPE vocabulary, and "
                f"data.tokenizer={kind}: add data.tokenizer=bpe (or leave data.bpe_vocab_size out)"
            )
        return
    for key in ("data.tokenizer", "data.bpe_vocab_size"):
        if key in typed:
            raise ConfigError(
                f"{key}={typed[key]}: data.tokenizer_from={typed['data.tokenizer_from']} decides "
                f"the tokenizer (its kind and size); leave {key} out"
            )


def use_resumed_tokenizer(cfg: DictConfig, ckpt: Path | None) -> None:
    """A resumed run tokenises as it did: from the checkpoint it resumes where it read another
    checkpoint's tokenizer (that one carries the same, and the base it named may be gone), and
    by learning one where it did (a fine-tune from before `data.tokenizer_from`)."""
    data = cfg.get("data") or {}
    if ckpt is None or "tokenizer_from" not in data:
        return
    saved = saved_hparam(read_checkpoint(ckpt, "ckpt_path", mmap=True), "cfg") or {}
    data.tokenizer_from = str(ckpt) if (saved.get("data") or {}).get("tokenizer_from") else None


def model_option_difference(first: Any, second: Any) -> str | None:
    """`model.<key>=<first's> there, <second's> now` for the first model option (block
    defaults filled in) that differs between two run configs, or None."""
    first, second = (with_block_defaults(_container(c).get("model")) for c in (first, second))
    return _differences(first, second, "model", {})


def architecture_difference(
    first: Any, second: Any, untied: bool = False
) -> tuple[str, str, str] | None:
    """The first of `BASE_MUST_MATCH` whose value differs between two run configs: (key, its
    value in `first`, in `second`), or None when they build the same architecture; `untied`:
    `second` may untie the head from the input embeddings that `first` tied (its weights fit
    the untied model: the head starts as a copy of the embeddings)."""
    first, second = (
        OmegaConf.create({**c, "model": with_block_defaults(c.get("model"))})
        for c in (_container(first), _container(second))
    )
    for key in BASE_MUST_MATCH:
        there, here = OmegaConf.select(first, key), OmegaConf.select(second, key)
        if untied and key == "model.tie_embeddings" and there is True and here is False:
            continue
        if there != here:
            if key.startswith("data.") and None in (there, here):
                key = _other_data(first, second) or key
                there, here = OmegaConf.select(first, key), OmegaConf.select(second, key)
            return key, _shown(there), _shown(here)
    return None


def _container(config: Any) -> dict[str, Any]:
    return OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config


def _other_data(first: DictConfig, second: DictConfig) -> str | None:
    """`data._target_` where the two runs' data modules differ: a data key one of them lacks
    means data of another kind (digits have no `data.tokenizer`), which `data.tokenizer=None`
    would not say."""
    key = "data._target_"
    return key if OmegaConf.select(first, key) != OmegaConf.select(second, key) else None


def _shown(value: Any) -> str:
    container = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return str(container).replace(" ", "")


def resolve_checkpoint(
    ckpt_path: str | None,
    runs_dir: Path | None,
    cfg: DictConfig | None = None,
    output_dir: Path | None = None,
    earlier_trials: Sequence[Path] = (),
) -> Path | None:
    """The checkpoint a run resumes from, and a log line saying why none where none is
    (`DataIdentity` says "resuming <path> (step …)" once the data is checked and it loads).

    `None` → fresh start; `auto` → the newest readable checkpoint of the run's own
    `<output_dir>/checkpoints/` (a requeued cluster job's, a rerun into a named folder), else
    of this run name (`<runs_dir>/*/checkpoints/*.ckpt`; a sweep trial's, whose `runs_dir` is
    None, those of `earlier_trials` instead, the same trial of interrupted sweeps, not other
    runs of its run name with other trainer settings; newest first) written by a run of the
    same model,
    data, strategy, optimizer, scheduler and seed as `cfg` (trainer settings such as max_steps
    may change);
    unreadable ones are skipped with a warning naming the file and the reason, those of other
    configurations with one line counting them.
    Anything else must be a readable checkpoint with training state, written by a run of
    the same configuration (one CheckpointError line otherwise: a state that would not load,
    or would silently train another run).
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "auto":
        ckpt = read_checkpoint(ckpt_path, "ckpt_path")
        saved_config(ckpt, ckpt_path)  # one line when it holds no advarch config
        if "loops" not in ckpt:
            raise CheckpointError(
                f"ckpt_path={ckpt_path!r} holds weights without training state (no loops, "
                "optimizer); to start from these weights use strategy=finetune "
                f"strategy.pretrained={ckpt_path}"
            )
        other = None if cfg is None else config_mismatch(ckpt, cfg, resuming=True)
        if other:  # it would not load, or would go on as another run: say so before any work
            what = "another model" if other.startswith("model.") else "another configuration"
            what = (
                "another task" if other.startswith("data._target_=") and ": a " in other else what
            )
            # a fine-tune of it only where one would be accepted (`check_base_fits`)
            base = saved_hparam(ckpt, "cfg")
            fits = base is not None and architecture_difference(base, cfg, untied=True) is None
            finetune = (f", or start from its weights with strategy=finetune "
                        f"strategy.pretrained={ckpt_path}") if fits else ""  # fmt: skip
            raise CheckpointError(
                f"ckpt_path={ckpt_path!r} was written by a run of {what} ({other}); resume "
                f"it with its own options{ran_with(Path(ckpt_path))} (trainer.* may change)"
                f"{finetune}"
            )
        check_not_training(Path(ckpt_path).expanduser(), output_dir, "ckpt_path")
        return Path(ckpt_path).expanduser()  # (`DataIdentity` says "resuming" once it loads)
    own = set() if output_dir is None else set(output_dir.glob("checkpoints/*.ckpt"))
    candidates = set() if runs_dir is None else set(runs_dir.glob("*/checkpoints/*.ckpt"))
    for trial in earlier_trials:
        candidates |= set(trial.glob("checkpoints/*.ckpt"))
    where = f"under {runs_dir}" if runs_dir is not None else "in this trial's earlier sweeps"
    if not candidates | own:
        log.info("ckpt_path=auto: no checkpoint %s yet; starting fresh", where)
        return None
    mismatch = (
        (lambda c: None) if cfg is None else (lambda c: config_mismatch(c, cfg, resuming=True))
    )
    path, unreadable, foreign = None, [], []
    # the run's own folder first (a rerun into a named folder, `hydra.sweep.dir=<sweep>`,
    # goes on from its checkpoints, not from a newer run's), then the others, newest first
    for group in (own, candidates - own):
        if group and path is None:
            path, _, skipped, other = newest_readable(group, mismatch=mismatch)
            unreadable, foreign = unreadable + skipped, foreign + other
    for reason in unreadable:  # damage: each file by name
        log.warning("ckpt_path=auto: skipping %s", reason)
    if foreign:  # runs of other options under the same run name: one line
        log.info("ckpt_path=auto: passing over %d newer checkpoint(s) of other configurations "
                 "(the newest: %s)", len(foreign), foreign[0])  # fmt: skip
    if path is None:
        log.warning(
            "ckpt_path=auto: no %scheckpoint of this configuration among the %d %s; starting fresh",
            "readable " if unreadable else "",
            len(candidates | own),
            where,
        )
        return None
    check_not_training(path, output_dir, "ckpt_path=auto: the newest checkpoint of this run")
    return path  # (`DataIdentity` says "ckpt_path=auto: resuming" once its data is checked)


def schedule_change(checkpoint: Path, cfg: DictConfig) -> str | None:
    """What resuming `checkpoint` with another `trainer.max_steps` does to the learning rate:
    the schedule is computed for the new length (a cosine's decay, any warm-up's tenth of the
    run), so the rate at the resumed step jumps; None where it stays."""
    import torch
    from hydra.utils import instantiate

    ckpt = read_checkpoint(checkpoint, "ckpt_path", mmap=True)
    before = ((saved_hparam(ckpt, "cfg") or {}).get("trainer") or {}).get("max_steps")
    now, step = OmegaConf.select(cfg, "trainer.max_steps"), int(ckpt.get("global_step", 0))
    scheduler = OmegaConf.select(cfg, "scheduler")
    steps = (before, now)
    if scheduler is None or before == now or not all(isinstance(n, int) and n > 0 for n in steps):
        return None
    make = instantiate(scheduler)  # (a partial: the strategy gives optimizer and total steps)
    rates = []
    for total in steps:
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        rates.append(make(optimizer, total).lr_lambdas[0](step))
    if math.isclose(*rates, rel_tol=1e-6):
        return None
    lr = float(OmegaConf.select(cfg, "optimizer.lr") or 1.0)
    choice = str(scheduler._target_).rsplit(".", 1)[-1]
    return (
        f"trainer.max_steps={now} (the checkpoint's run: {before}): scheduler={choice} is "
        f"computed over {now} steps from here on, so the learning rate at step {step} is "
        f"{rates[1] * lr:.2e}, where the {before}-step schedule had {rates[0] * lr:.2e}"
    )


def evaluation_change(checkpoint: Path, cfg: DictConfig) -> str | None:
    """What resuming `checkpoint` with other `EVALUATION_ONLY` keys does (None where they are
    its run's): validation scores other sequences from here on than the curves so far."""
    saved = saved_hparam(read_checkpoint(checkpoint, "ckpt_path", mmap=True), "cfg") or {}
    for group, keys in EVALUATION_ONLY.items():
        for key in keys:
            before = (saved.get(group) or {}).get(key)
            now = OmegaConf.select(cfg, f"{group}.{key}")
            if key in (saved.get(group) or {}) and before != now:
                return (
                    f"{group}.{key}={now} (the checkpoint's run: {before}): validation and the "
                    "test score other sequences than its curves so far, its best checkpoints' "
                    "ranking and early stopping's count"
                )
    return None


def check_not_training(checkpoint: Path, output_dir: Path | None, what: str) -> None:
    """One CheckpointError line if `checkpoint`'s run (not this one) is still training: both
    would write its checkpoints and W&B run."""
    run_dir = run_dir_of(checkpoint)
    if output_dir is not None and run_dir.resolve() == output_dir.resolve():
        return  # (this run's own folder: a requeued job resuming itself)
    pid = holder(run_dir)
    if pid is not None:
        other = ", or give this run another run_name" if what.startswith("ckpt_path=auto") else ""
        raise CheckpointError(
            f"{what}, {checkpoint}, belongs to a run still training (process {pid}): stop it "
            f"before resuming it{other}"
        )


def previous_wandb_id(checkpoint: Path | None) -> str | None:
    """The W&B run id saved by the run that wrote `checkpoint`, so a resume continues it; a
    file that holds no valid id is skipped with a warning (the resume gets a new W&B run)."""
    if checkpoint is None:
        return None
    file = run_dir_of(checkpoint) / WANDB_ID_FILE
    if not file.is_file():
        return None
    try:
        run_id = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        run_id, reason = None, f"unreadable ({type(err).__name__})"
    else:
        bad = sorted(set(run_id) & set(WANDB_ID_FORBIDDEN + " \t\n"))
        reason = "empty" if not run_id else f"has {''.join(bad)!r}" if bad else None
    if reason is None:
        return run_id
    log.warning("%s is not a W&B run id (%s): this run starts a new W&B run", file, reason)
    return None
