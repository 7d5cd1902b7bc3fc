"""Which strategy, data and model go together, decided from config names alone.

Two jobs, both before anything heavy is imported or read:

- `with_strategy_defaults(overrides)`: each strategy brings a sensible data choice when the
  user names none (`with_default_data`, `STRATEGY_DATA`): `strategy=ewc` → `data=text_domains`
  (continual language modelling over domains), and the optimizer/scheduler values it trains
  with (`with_default_optimization`, `STRATEGY_OPTIMIZATION`): `strategy=finetune` →
  `scheduler.warmup_steps=20`. It rewrites the command-line overrides BEFORE Hydra composes,
  so the choices show in the config tree, `.hydra/overrides.yaml` and the run's choices like
  any other; `strategy=fewshot` also sets `model.feature_patch=64` on packaged models that have
  it (`with_default_model`, `STRATEGY_MODEL`). The user's own `data=`, `optimizer…`/`scheduler…`
  and model keys or an `experiment=` (which pins its own) always win.
- `check_combination(cfg)`: an impossible model × data × strategy combination stops with one
  `ConfigError` line naming the keys and a combination that works, before the config tree is
  printed, before torch is imported and before any data is read. What a strategy and a model
  need of their data (`STRATEGY_NEEDS`, `_model_need`) are checked together, so a hint names
  only data that suits both (and another strategy where none does): following it passes.

Both work from the `_target_` class paths in `DATA`/rules below (importing the classes would
import torch, seconds on a busy machine); `tests/test_combinations.py` checks the table
against the real datamodules. Targets not listed (a user's own classes) are not checked.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from advarch.checkpoint import checkpoint_file
from advarch.config.typed import typed_overrides
from advarch.data.stdlib_domains import check_domains
from advarch.errors import ConfigError

# strategy → data when the user names none (strategies not listed keep train.yaml's `text`)
STRATEGY_DATA = {
    "ewc": "text_domains",
    "naive": "text_domains",
    "multitask": "mmoe_synthetic",
    "fewshot": "fewshot_synthetic",
    "retrofit": "text_retrieval",
}
PINS_DATA = ("data", "experiment")  # override keys after which the data choice is the user's
# strategy → optimizer/scheduler values it trains with (the others keep configs/optimizer/adamw
# and configs/scheduler/cosine as they are): episodes want less decay, fine-tunes of a frozen
# base are short, so their warm-up is too.
STRATEGY_OPTIMIZATION: dict[str, dict[str, float | int]] = {
    "fewshot": {"optimizer.lr": 1e-3, "optimizer.weight_decay": 0.01},
    "finetune": {"scheduler.warmup_steps": 20},
    "retrofit": {"optimizer.lr": 3e-3, "scheduler.warmup_steps": 20},
}

# strategy → model keys it trains with, set where the chosen packaged model has them: few-shot
# episodes are feature vectors whose class signal is mixed across all features, which one
# shared patch projection cannot unmix (5-way accuracy at chance with patches of 8)
STRATEGY_MODEL: dict[str, dict[str, int]] = {"fewshot": {"model.feature_patch": 64}}
PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_MODEL = "moe"  # train.yaml's
DEFAULT_DATA = "text"  # train.yaml's
# a retrofit's model → the plain decoder of its sizes it starts from (README: Retrieval)
RETROFIT_BASES = {"retro": "transformer", "retro_moe": DEFAULT_MODEL}


@dataclass(frozen=True)
class DataFacts:
    """What a datamodule serves, as far as combinations care.

    Attributes:
        kind: `lm`, `classification`, `regression` or `seq2seq` (its DataSpec kind).
        stream: a task stream (one task at a time; `advarch.spec.TaskStream`).
        multitask: several tasks served together in every batch.
        episodes: few-shot episodes (support/query batches).
        features: feature-vector inputs; None = `data.input_format` decides.
        retrieval: batches always carry RETRO neighbours (else only with `data.retrieval`).
    """

    kind: str
    stream: bool = False
    multitask: bool = False
    episodes: bool = False
    features: bool | None = False
    retrieval: bool = False


DIGITS = "advarch.data.digits."
TEXT_DOMAINS = "advarch.data.text_domains.TextDomainsDataModule"
DATA: dict[str, DataFacts] = {
    "advarch.data.text.TextDataModule": DataFacts("lm"),
    TEXT_DOMAINS: DataFacts("lm", stream=True),
    "advarch.data.retro_lookup.RetroLookupDataModule": DataFacts("lm", retrieval=True),
    DIGITS + "DigitsDataModule": DataFacts("classification", features=None),
    DIGITS + "PermutedDigitsDataModule": DataFacts("classification", stream=True, features=None),
    DIGITS + "SplitDigitsDataModule": DataFacts("classification", stream=True, features=None),
    DIGITS + "RotatedDigitsDataModule": DataFacts("classification", stream=True, features=None),
    "advarch.data.episodes.FewShotDataModule": DataFacts(
        "classification", episodes=True, features=None
    ),
    "advarch.data.mmoe_synthetic.MMoESyntheticDataModule": DataFacts(
        "regression", multitask=True, features=True
    ),
    "advarch.data.synthetic.SelectiveCopyingDataModule": DataFacts("lm"),
    "advarch.data.synthetic.AssociativeRecallDataModule": DataFacts("lm"),
    "advarch.data.synthetic.SequenceReversalDataModule": DataFacts("seq2seq"),
}
CONTINUAL = ("advarch.strategies.continual.ContinualStrategy", "advarch.strategies.ewc.EWCStrategy")
MULTITASK = "advarch.strategies.multitask.MultiTaskStrategy"
FEWSHOT = "advarch.strategies.fewshot.FewShotStrategy"
FINETUNE = "advarch.strategies.finetune.FinetuneStrategy"
PLAIN = "advarch.strategies.plain.PlainStrategy"
MMOE = "advarch.models.mmoe.MultiGateMoE"


@dataclass(frozen=True)
class Need:
    """What a strategy or a model needs of its data, and the packaged data that has it.

    Attributes:
        what: the need as a message says it (`trains a task stream`).
        fits: whether a datamodule, by its facts and its config, serves it.
        options: packaged data options that serve it, in the order a hint names them.
        lacking: how a message says data lacks it (None: `is <what the data is>`; `{what}`
            stands for what the data is).
        instead: the hint where the fix is not other data but keys or another strategy
            (`{one_task}`: the key that keeps one task of the data); None: the options.
    """

    what: str
    fits: Callable[[DataFacts, Mapping[str, Any]], bool]
    options: tuple[str, ...]
    lacking: str | None = None
    instead: str | None = None


def _continual_stream(facts: DataFacts, _: Mapping[str, Any]) -> bool:
    return facts.stream and facts.kind in ("lm", "classification")


def _one_task(facts: DataFacts, data: Mapping[str, Any]) -> bool:
    """Whether data is not a task stream, or a stream of one task (`data.domains=[codecs]`,
    `data.num_tasks=1`): trained as one task, it is one corpus."""
    domains = data.get("domains")
    return not facts.stream or (len(domains) if domains is not None else data.get("num_tasks")) == 1


def _one_task_need(instead: str) -> Need:
    """What a strategy without task boundaries needs: one task, as the data that is not a
    stream (any model's, for hints that must serve it too) has it; on a stream it would train
    the tasks one after another without the continual metrics, so the hint is `instead`."""
    return Need(
        "trains one task",
        _one_task,
        ("text", "digits", "text_retrieval", "retro_lookup", "mmoe_synthetic", "seq2seq_reverse"),
        "is {what}, whose tasks it would train one after another without continual metrics",
        instead,
    )


STREAM_NEED = Need("trains a task stream", _continual_stream, ("text_domains", "permuted_digits"))
STRATEGY_NEEDS: dict[str, Need] = {
    **dict.fromkeys(CONTINUAL, STREAM_NEED),
    PLAIN: _one_task_need(
        "strategy=naive (in sequence, with cl/* metrics and matrix) or strategy=naive "
        "strategy.joint=true (all at once)"
    ),
    FINETUNE: _one_task_need(  # (strategy=retrofit too)
        "{one_task} (a stream of one task) or strategy=naive (the stream in sequence, with "
        "cl/* metrics and matrix, from scratch)"
    ),
    MULTITASK: Need(
        "trains several tasks together", lambda facts, _: facts.multitask, ("mmoe_synthetic",)
    ),
    FEWSHOT: Need(
        "needs episodes",
        lambda facts, _: facts.episodes,
        ("fewshot_synthetic", "fewshot_rotated_digits"),
    ),
}
# the MMoE family's data (feature vectors), in the order a hint names them
FEATURE_DATA = ("mmoe_synthetic", "permuted_digits", "digits", "fewshot_synthetic")


# -- default data -----------------------------------------------------------------------------
# the `data=` overrides this process's command line got from its strategy, not from the user
STRATEGY_BROUGHT: set[str] = set()


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _assignments(overrides: list[str]) -> list[str]:
    return [o for o in overrides if _is_assignment(o)]


def _is_assignment(word: str) -> bool:
    return "=" in word and not word.startswith("-")


def _added(overrides: list[str], defaults: list[str]) -> list[str]:
    """`overrides` with `defaults` after its last assignment: Hydra's parser reads the
    overrides as one run of words, so a default after a flag (`strategy=ewc --cfg job`) was an
    'unrecognized argument'."""
    last = max((i for i, o in enumerate(overrides) if _is_assignment(o)), default=-1)
    return [*overrides[: last + 1], *defaults, *overrides[last + 1 :]]


def _strategies(assignments: list[str]) -> list[str]:
    """The strategies the (last) `strategy=` names: one, or several for a sweep `a,b`."""
    strategies = [o.split("=", 1)[1] for o in assignments if _key(o) == "strategy"]
    return [s.strip() for s in strategies[-1].split(",")] if strategies else []


def with_strategy_defaults(overrides: list[str]) -> list[str]:
    """The command line with the named strategy's default data, optimisation and model keys
    added."""
    return with_default_model(with_default_optimization(with_default_data(overrides)))


def with_default_data(overrides: list[str]) -> list[str]:
    """`overrides` plus `data=<the strategy's default>` when they name a strategy with a
    default data (`STRATEGY_DATA`) and neither `data=` nor `experiment=`.

    A sweep over strategies (`strategy=naive,ewc`) gets the default only when every strategy
    in it has the same one. Command-line flags and other overrides pass through unchanged.
    """
    STRATEGY_BROUGHT.clear()  # (this command line's, not an earlier one's in this process)
    assignments = _assignments(overrides)
    if any(_key(o) in PINS_DATA for o in assignments):
        return overrides
    defaults = {STRATEGY_DATA.get(s) for s in _strategies(assignments)}
    if len(defaults) != 1 or None in defaults:
        return overrides
    STRATEGY_BROUGHT.add(f"data={next(iter(defaults))}")
    return _added(overrides, [f"data={defaults.pop()}"])


def with_default_optimization(overrides: list[str]) -> list[str]:
    """`overrides` plus the named strategy's `STRATEGY_OPTIMIZATION` values, each unless the
    user sets that key, chooses another option of its group (`optimizer=sgd`) or an
    `experiment=`; a sweep over strategies only when all of them have the same values."""
    assignments = _assignments(overrides)
    keys = {_key(o) for o in assignments}
    values = {frozenset(STRATEGY_OPTIMIZATION.get(s, {}).items()) for s in _strategies(assignments)}
    if "experiment" in keys or len(values) != 1:
        return overrides
    chosen = sorted(values.pop())
    return _added(overrides, [f"{k}={v}" for k, v in chosen if not {k, k.split(".")[0]} & keys])


def with_default_model(overrides: list[str]) -> list[str]:
    """`overrides` plus the named strategy's `STRATEGY_MODEL` keys, each unless the user sets
    it or an `experiment=`, and only where every chosen model is a packaged config that has
    the key (a user's own model keeps its own)."""
    assignments = _assignments(overrides)
    keys = {_key(o) for o in assignments}
    values = {frozenset(STRATEGY_MODEL.get(s, {}).items()) for s in _strategies(assignments)}
    own_configs = any(o.startswith(("--config-dir", "-cd", "hydra.searchpath")) for o in overrides)
    if "experiment" in keys or len(values) != 1 or own_configs:
        return overrides  # (a config folder of the user's may hold the model)
    models = [o.split("=", 1)[1] for o in assignments if _key(o) == "model"]
    chosen = [m.strip() for m in (models[-1] if models else DEFAULT_MODEL).split(",")]
    added = [f"{k}={v}" for k, v in sorted(values.pop()) if k not in keys
             and all(_model_has(m, k.split(".", 1)[1]) for m in chosen)]  # fmt: skip
    return _added(overrides, added)


def _model_has(choice: str, key: str) -> bool:
    """Whether the packaged model config `choice` (with the configs it builds on) sets `key`."""
    return key in packaged_config("model", choice)


@cache
def packaged_config(group: str, choice: str) -> dict[str, Any]:
    """The packaged config `choice` of `group` over the configs it builds on (data=
    text_retrieval: text's keys, then its own; sections replaced whole); {} where the package
    has no such option. Shared: not to be changed."""
    config = _packaged_yaml(group, choice)
    merged: dict[str, Any] = {}
    for base in _bases(config.pop("defaults", [])):
        merged |= packaged_config(group, base)
    return merged | config


def _packaged_yaml(group: str, choice: str) -> dict[str, Any]:
    """The packaged file `configs/<group>/<choice>.yaml` as written; {} where there is none."""
    path = PACKAGE_CONFIGS / group / f"{choice}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _bases(defaults: list[Any]) -> list[str]:
    """The options of its own group a config's defaults list builds on (not `_self_`, not
    other groups' `override /group: option`)."""
    return [d for d in defaults if isinstance(d, str) and d != "_self_"]


def _base_experiment(experiment: str | None) -> str | None:
    """The packaged experiment a fine-tuning experiment builds on, whose run its
    `strategy.pretrained` is (finetune_new_experts_5_9 → pretrain_digits_0_4); None if none."""
    if not experiment:
        return None
    bases = _bases(_packaged_yaml("experiment", experiment).get("defaults", []))
    return bases[0] if bases else None


# -- impossible combinations ------------------------------------------------------------------
def _choices() -> dict[str, str]:
    """The group choices of the composed config (`data` → `text`), if Hydra knows them."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except (ValueError, AttributeError):
        return {}


def _typed_groups() -> set[str]:
    """The config groups the command line chose (`data` for `data=text`), if Hydra knows it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except (ValueError, AttributeError):
        return set()
    return {o.lstrip("+").split("=", 1)[0] for o in task if "=" in o}


def _check_stream_length(data: Mapping[str, Any], name: str) -> None:
    """A task stream trains every task in turn for a length of its own (`TaskStream`): a
    typed `trainer.max_steps` or `trainer.max_epochs` would be overridden without a word, and
    `trainer.max_time` would end the stream after some tasks, its continual metrics read as
    if it were whole."""
    length = "data.steps_per_task" if "steps_per_task" in data else "data.epochs_per_task"
    tasks = "data.domains" if "domains" in data else "data.num_tasks"
    typed = typed_overrides()
    for key in ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time"):
        value = typed.get(key, "-1")
        if value not in ("-1", "null", ""):  # ("": `~key`, the default)
            raise ConfigError(
                f"{key}={value}: data={name} is a task stream, which trains each task in turn "
                f"for {length} ({tasks} sets the tasks); set those instead"
            )


def _describe(kind: str, facts: DataFacts) -> str:
    if facts.stream:
        return f"{'an' if kind == 'lm' else 'a'} {kind} task stream"
    if facts.episodes:
        return "few-shot episodes"
    if facts.multitask:
        return f"multi-task {kind} data"
    return {"lm": "one language-modelling corpus"}.get(kind, f"single-task {kind} data")


def check_combination(cfg: DictConfig) -> None:
    """Raise a one-line ConfigError for a model × data × strategy combination that cannot run.

    Raises:
        ConfigError: naming the keys as typed (`strategy=fewshot data=text`) and a
            combination that works.
    """
    choices = _choices()
    names = {
        g: choices.get(g) or str(cfg[g].get("_target_", "?")).rsplit(".", 1)[-1]
        for g in ("data", "model", "strategy")
        if cfg.get(g) is not None
    }
    if choices.get("experiment"):  # (no strategy default replaces its data choice)
        names["experiment"] = choices["experiment"]
    strategy, data, model = (cfg.get(g) or {} for g in ("strategy", "data", "model"))
    strategy_target = strategy.get("_target_")
    if strategy_target == FINETUNE:
        _check_retrofit(strategy, model, names)
    facts = DATA.get(data.get("_target_"))
    if data.get("_target_") == TEXT_DOMAINS and OmegaConf.is_list(data.get("domains")):
        try:  # (before the strategy's fit: its hint names the first domain)
            check_domains(list(data.domains))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if facts is not None:
        _check_data(strategy_target, model, facts, data, names)
    if facts is not None and facts.stream:
        _check_stream_length(data, names["data"])
    if strategy_target == FINETUNE:  # (after what no checkpoint would help)
        base = _base_command(choices, names["strategy"])
        _check_pretrained(strategy.get("pretrained"), names["strategy"], base)


def _check_data(
    strategy_target: str | None,
    model: Mapping[str, Any],
    facts: DataFacts,
    data: Mapping[str, Any],
    names: dict[str, str],
) -> None:
    """The strategy's and the model's needs (`_check_needs`), then episodes only fewshot reads."""
    what = _describe(facts.kind, facts)
    _check_needs(STRATEGY_NEEDS.get(strategy_target), _model_need(model), facts, data, names, what)
    using = f"strategy={names['strategy']} data={names['data']}"
    ours = str(strategy_target).startswith("advarch.strategies.")  # (a user's may read them)
    if facts.episodes and ours and strategy_target != FEWSHOT:
        raise ConfigError(
            f"{using}: data={names['data']} serves {what} (support and query sets), which "
            f"only strategy=fewshot trains; use strategy=fewshot data={names['data']}"
        )


def _check_needs(
    wanted: Need | None,
    needed: Need | None,
    facts: DataFacts,
    data: Mapping[str, Any],
    names: dict[str, str],
    what: str,
) -> None:
    """The strategy's need (`wanted`) and the model's (`needed`) against the data. A hint names
    only data that serves both, so following it passes; where no data does, another strategy."""
    strategy_ok = wanted is None or wanted.fits(facts, data)
    model_ok = needed is None or needed.fits(facts, data)
    if strategy_ok and model_ok:
        return
    model, strategy, chosen = names["model"], names["strategy"], names["data"]
    if wanted is not None and needed is not None and not _serving(wanted, needed):
        raise ConfigError(
            f"model={model} strategy={strategy}: model={model} {needed.what} and strategy="
            f"{strategy} {wanted.what}, but no data does both; use strategy=plain "
            f"data={needed.options[0]}"
        )
    if not strategy_ok:
        options = _serving(wanted, needed) if needed is not None else list(wanted.options)
        leave = ", or leave data= out" if STRATEGY_DATA.get(strategy) in options else ""
        if "experiment" in names:  # (typed, or its file's choice: no strategy default)
            experiment = names["experiment"]
            packaged = (PACKAGE_CONFIGS / "experiment" / f"{experiment}.yaml").is_file()
            chose_data = "data" not in _typed_groups()  # (its file did, a user's own to edit)
            edit = f" (typed, or in experiment={experiment}: override /data: {options[0]})"
            leave = edit if chose_data and not packaged else ""
        hint = " or ".join(f"data={o}" for o in options) + leave
        if wanted.instead is not None and model_ok:  # (else other data serves the model too)
            hint = wanted.instead.format(one_task=_one_task_key(data))
        raise ConfigError(
            f"strategy={strategy} data={chosen}: strategy={strategy} {wanted.what}, but data="
            f"{chosen} {_lacks(wanted, what)}; use {hint}"
        )
    option = (_serving(needed, wanted) if wanted is not None else needed.options)[0]
    using, given = f"model={model} data={chosen}", f"data={chosen}"
    if given in STRATEGY_BROUGHT:  # (said as what the user typed: the strategy)
        using, given = f"model={model} strategy={strategy}", f"{given} (strategy={strategy}'s)"
    raise ConfigError(
        f"{using}: model={model} {needed.what}, but {given} {_lacks(needed, what)}; use "
        f"model={model} data={option}"
    )


def _lacks(need: Need, what: str) -> str:
    """How a message says data that is `what` lacks `need` (`is an lm task stream`)."""
    return (need.lacking or "is {what}").format(what=what)


def _one_task_key(data: Mapping[str, Any]) -> str:
    """The override that keeps one task of a task stream: its first domain or task."""
    domains = data.get("domains")
    return "data.num_tasks=1" if domains is None else f"data.domains=[{domains[0]}]"


def _model_need(model: Mapping[str, Any]) -> Need | None:
    """What the model needs of its data: feature vectors (the MMoE family), source and target
    sequences (an encoder–decoder) or neighbours (RETRO); None where any data fits."""
    if model.get("_target_") == MMOE:
        return Need("reads feature vectors", _feature_vectors, FEATURE_DATA)
    if model.get("encoder_depth"):
        return Need(
            f"is an encoder–decoder (model.encoder_depth={model.get('encoder_depth')})",
            lambda facts, _: facts.kind == "seq2seq",
            ("seq2seq_reverse",),
        )
    if model.get("retro"):
        return Need(
            "retrieves neighbours",
            lambda facts, data: facts.retrieval or bool(data.get("retrieval")),
            ("text_retrieval", "retro_lookup"),
            lacking="has none",
        )
    global_tokens = (model.get("swa") or {}).get("global_tokens")
    if global_tokens and "swa" in _layers(model.get("layers"), model.get("depth")):
        return Need(
            f"has global tokens (model.swa.global_tokens={list(global_tokens)}), which need "
            "bidirectional attention",
            lambda facts, _: facts.kind != "lm",
            ("digits", "seq2seq_reverse"),
        )
    return None


def _layers(pattern: Any, depth: Any) -> list[str]:
    """The mixers a `model.layers` pattern (a name or a list of them) gives `model.depth`
    layers: cycled to it, or cut (`model=hybrid model.depth=2`: no swa layer)."""
    names = [pattern] if isinstance(pattern, str) else [str(p) for p in pattern or ()]
    count = depth if isinstance(depth, int) and depth > 0 else len(names)
    return [names[i % len(names)] for i in range(count)] if names else []


def _feature_vectors(facts: DataFacts, data: Mapping[str, Any]) -> bool:
    """Feature-vector inputs of regression or classification (digits: `data.input_format`)."""
    features = facts.features
    if features is None:
        features = data.get("input_format", "features") == "features"
    return features and facts.kind in ("regression", "classification")


def _serving(need: Need, also: Need) -> list[str]:
    """`need`'s data options that serve `also` too, in `need`'s order."""
    return [option for option in need.options if _serves(also, option)]


def _serves(need: Need, option: str) -> bool:
    """Whether the packaged data option `option` (`configs/data/<option>.yaml`) serves `need`."""
    data = packaged_config("data", option)
    return need.fits(DATA[data["_target_"]], data)


def _check_retrofit(
    strategy: Mapping[str, Any], model: Mapping[str, Any], names: dict[str, str]
) -> None:
    """A fine-tune that trains RETRO's encoder and cross-attention (`strategy=retrofit`:
    `model.retro.*`) needs a model that has them; said before the checkpoint is asked for, as
    no checkpoint helps (else: a pattern that "matches no parameter" once the model is built)."""
    patterns = [p for p in strategy.get("trainable") or [] if str(p).startswith("model.retro")]
    if patterns and not model.get("retro"):
        raise ConfigError(
            f"model={names['model']} strategy={names['strategy']}: strategy="
            f"{names['strategy']} adds retrieval to a trained decoder (strategy.trainable="
            f"[{', '.join(patterns)}]), so it needs model=retro or model=retro_moe"
        )


def _base_command(choices: Mapping[str, str], strategy: str) -> str:
    """The `python train.py …` of a run this fine-tune can start from: the experiment it
    builds on (`_base_experiment`), else this run's experiment, model (a retrofit's without
    RETRO, `RETROFIT_BASES`) and data (a retrofit's: the same documents in the same splits;
    data of other inputs than text's: digits; not a stream, which plain training refuses), at
    this run's debug sizes."""
    experiment = choices.get("experiment")
    base = _base_experiment(experiment)
    words = ["python train.py", f"experiment={base or experiment}" if base or experiment else ""]
    if not base:
        model = choices.get("model") or DEFAULT_MODEL
        retrofit = strategy == "retrofit"
        model = RETROFIT_BASES.get(model, model) if retrofit else model
        words.append(f"model={model}" if model != DEFAULT_MODEL else "")
        data = choices.get("data")
        facts = DATA.get(packaged_config("data", data).get("_target_")) if data else None
        own = facts is not None and not facts.stream and data != DEFAULT_DATA  # (its inputs)
        words.append(f"data={data}" if not experiment and (retrofit or own) else "")
    words.append(f"debug={choices['debug']}" if choices.get("debug") else "")
    return " ".join(w for w in words if w)


def _check_pretrained(pretrained: str | None, name: str, command: str) -> None:
    """A fine-tune names its base checkpoint; the refusal names a run that fits
    (`_base_command`)."""
    if not pretrained:
        raise ConfigError(
            f"strategy={name} fine-tunes a trained base: add strategy.pretrained=<run>/"
            f"checkpoints/last.ckpt (e.g. of a `{command}` run)"
        )
    checkpoint_file(pretrained, "strategy.pretrained")
