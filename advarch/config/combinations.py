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
  printed, before torch is imported and before any data is read.

Both work from the `_target_` class paths in `DATA`/rules below (importing the classes would
import torch, seconds on a busy machine); `tests/test_combinations.py` checks the table
against the real datamodules. Targets not listed (a user's own classes) are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from omegaconf import DictConfig

from advarch.checkpoint import checkpoint_file
from advarch.config.validate import ConfigError

# strategy → data when the user names none (strategies not listed keep train.yaml's `text`)
STRATEGY_DATA = {
    "ewc": "text_domains",
    "naive": "text_domains",
    "multitask": "mmoe_synthetic",
    "fewshot": "fewshot_synthetic",
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
MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
DEFAULT_MODEL = "moe"  # train.yaml's


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
DATA: dict[str, DataFacts] = {
    "advarch.data.text.TextDataModule": DataFacts("lm"),
    "advarch.data.text_domains.TextDomainsDataModule": DataFacts("lm", stream=True),
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
MMOE = "advarch.models.mmoe.MultiGateMoE"


# -- default data -----------------------------------------------------------------------------
def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _assignments(overrides: list[str]) -> list[str]:
    return [o for o in overrides if "=" in o and not o.startswith("-")]


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
    assignments = _assignments(overrides)
    if any(_key(o) in PINS_DATA for o in assignments):
        return overrides
    defaults = {STRATEGY_DATA.get(s) for s in _strategies(assignments)}
    if len(defaults) != 1 or None in defaults:
        return overrides
    return [*overrides, f"data={defaults.pop()}"]


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
    return [*overrides, *(f"{k}={v}" for k, v in chosen if not {k, k.split(".")[0]} & keys)]


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
    return [*overrides, *(f"{k}={v}" for k, v in sorted(values.pop()) if k not in keys
                          and all(_model_has(m, k.split(".", 1)[1]) for m in chosen))]  # fmt: skip


def _model_has(choice: str, key: str) -> bool:
    """Whether the packaged model config `choice` (with the configs it builds on) sets `key`."""
    path = MODEL_CONFIGS / f"{choice}.yaml"
    if not path.is_file():
        return False
    config = yaml.safe_load(path.read_text()) or {}
    bases = [d for d in config.get("defaults", []) if isinstance(d, str) and d != "_self_"]
    return key in config or any(_model_has(base, key) for base in bases)


# -- impossible combinations ------------------------------------------------------------------
def _choices() -> dict[str, str]:
    """The group choices of the composed config (`data` → `text`), if Hydra knows them."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return dict(HydraConfig.get().runtime.choices)
    except (ValueError, AttributeError):
        return {}


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
    strategy, data, model = (cfg.get(g) or {} for g in ("strategy", "data", "model"))
    strategy_target = strategy.get("_target_")
    if strategy_target == FINETUNE:
        _check_pretrained(strategy.get("pretrained"), names["strategy"])
    facts = DATA.get(data.get("_target_"))
    if facts is None:
        return
    using = f"strategy={names['strategy']} data={names['data']}"
    what = _describe(facts.kind, facts)
    if strategy_target in CONTINUAL and not (
        facts.stream and facts.kind in ("lm", "classification")
    ):
        raise ConfigError(
            f"{using}: strategy={names['strategy']} trains a task stream, but data="
            f"{names['data']} is {what}; use data=text_domains (domains of the corpus) or "
            f"data=permuted_digits, or leave data= out"
        )
    if strategy_target == MULTITASK and not facts.multitask:
        raise ConfigError(
            f"{using}: strategy=multitask trains several tasks together, but data="
            f"{names['data']} is {what}; use data=mmoe_synthetic, or leave data= out"
        )
    if strategy_target == FEWSHOT and not facts.episodes:
        raise ConfigError(
            f"{using}: strategy=fewshot needs episodes, but data={names['data']} is {what}; "
            f"use data=fewshot_synthetic or data=fewshot_rotated_digits, or leave data= out"
        )
    ours = str(strategy_target).startswith("advarch.strategies.")  # (a user's may read them)
    if facts.episodes and ours and strategy_target != FEWSHOT:
        raise ConfigError(
            f"{using}: data={names['data']} serves {what} (support and query sets), which "
            f"only strategy=fewshot trains; use strategy=fewshot data={names['data']}"
        )
    _check_model(model, data, facts, names, what)


def _check_model(
    model: DictConfig, data: DictConfig, facts: DataFacts, names: dict[str, str], what: str
) -> None:
    using = f"model={names['model']} data={names['data']}"
    if model.get("_target_") == MMOE:
        features = facts.features
        if features is None:
            features = data.get("input_format", "features") == "features"
        if not features or facts.kind not in ("regression", "classification"):
            raise ConfigError(
                f"{using}: model={names['model']} reads feature vectors, but data="
                f"{names['data']} is {what}; use model={names['model']} data=mmoe_synthetic "
                "strategy=multitask"
            )
    if model.get("encoder_depth") and facts.kind != "seq2seq":
        raise ConfigError(
            f"{using}: model={names['model']} is an encoder–decoder (model.encoder_depth="
            f"{model.encoder_depth}), but data={names['data']} is {what}; use "
            f"model={names['model']} data=seq2seq_reverse"
        )
    if model.get("retro") and not (facts.retrieval or data.get("retrieval")):
        raise ConfigError(
            f"{using}: model={names['model']} retrieves neighbours, but data={names['data']} "
            f"has none; use model={names['model']} data=text_retrieval"
        )


def _check_pretrained(pretrained: str | None, name: str) -> None:
    if not pretrained:
        raise ConfigError(
            f"strategy={name} fine-tunes a trained base: add strategy.pretrained=<run>/"
            "checkpoints/last.ckpt (e.g. of a `python train.py` run)"
        )
    checkpoint_file(pretrained, "strategy.pretrained")
