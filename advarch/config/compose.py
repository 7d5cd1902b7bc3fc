"""Composing a training config in code exactly as the `train.py` command line would.

For scripts that run many trainings in one process (reports, demos) and for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict

from advarch.config.combinations import with_strategy_defaults
from advarch.errors import ConfigError

# The configs ship inside the package (advarch/configs), so a wheel install finds them anywhere.
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def compose_run(
    overrides: list[str],
    output_dir: Path,
    config_name: str = "train",
    root_dir: Path | None = None,
) -> DictConfig:
    """`advarch/configs/<config_name>.yaml` with `overrides`, writing into `output_dir`.

    Training configs get the strategy's default data and optimisation as on the command line
    (`advarch.config.combinations.with_strategy_defaults`).

    `root_dir` (default: the working directory) anchors `outputs/cache` and `outputs/runs`.
    The config tree is not printed; the Hydra node is resolved away, so `run(cfg)` works
    outside `@hydra.main`. An override that does not compose raises `ConfigError`.
    """
    if config_name == "train":
        overrides = with_strategy_defaults(overrides)
    try:
        cfg = compose_packaged(overrides, config_name)
    except HydraException as err:  # an unknown key or group: one line, as train.py says it
        raise ConfigError(" ".join(str(err).split())) from err
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        if root_dir is not None:
            cfg.paths.root_dir = str(root_dir)
        cfg.paths.output_dir = str(output_dir)
        if "extras" in cfg:
            cfg.extras.print_config = False
        del cfg.hydra
    GlobalHydra.instance().clear()
    apply_debug_sizes(cfg, overrides)
    return cfg


def compose_packaged(overrides: Sequence[str], config_name: str = "train") -> DictConfig:
    """The packaged `<config_name>.yaml` with `overrides`, Hydra node included, composed as
    the command line would; Hydra's exceptions as it raises them, and a config file that is
    not YAML as a ConfigError naming it."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            return compose(config_name, overrides=list(overrides), return_hydra_config=True)
    except yaml.MarkedYAMLError as err:  # (a user's `--config-dir` file: Hydra's traceback)
        raise _yaml_error(err) from None


def check_yaml(path: Path) -> None:
    """Raise `ConfigError` where the config file `path` is not YAML (`_yaml_error`)."""
    try:
        with path.open() as file:  # (the parser's marks name the file)
            yaml.safe_load(file)
    except yaml.MarkedYAMLError as err:
        raise _yaml_error(err) from None


def _yaml_error(err: yaml.MarkedYAMLError) -> ConfigError:
    """`<file> is not valid YAML (line L, column C: <what the parser expected>)`, at the
    construct the problem is in (the `[` a list never closes) when the parser names one."""
    mark = err.context_mark or err.problem_mark
    what = ": ".join(m for m in (err.context, err.problem) if m)
    return ConfigError(
        f"{mark.name} is not valid YAML (line {mark.line + 1}, column {mark.column + 1}: {what})"
    )


def apply_debug_sizes(cfg: DictConfig, overrides: Sequence[str]) -> bool:
    """Set `debug_model`'s sizes (`debug=tiny`: width, depth, heads, FFN width) on the model
    keys of those names the model's config has, unless the command line sets them
    (`debug=tiny model.dim=64`), the depth no lower than the layer patterns' length (every
    block of `model=hybrid` still runs); whether any was set. A typed `data.steps_per_task`
    trains that many steps a task (not debug=tiny's 3). Every sequence model has them all; the
    MMoE models have none (they are tiny already), so they keep their own config. The
    strategy's keys of `debug_strategy` (EWC's `fisher_samples`) are set alike, over what an
    experiment set too."""
    sizes = cfg.get("debug_model")
    if sizes is None or cfg.get("model") is None:
        return False
    typed = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    strategy = cfg.get("strategy") or {}
    shrunk = {k: v for k, v in (cfg.get("debug_strategy") or {}).items()
              if k in strategy and f"strategy.{k}" not in typed}  # fmt: skip
    for key, value in shrunk.items():
        cfg.strategy[key] = value
    stream_steps = "data.steps_per_task" in typed and "trainer.limit_train_batches" not in typed
    stream_steps = stream_steps and OmegaConf.select(cfg, "trainer.limit_train_batches") is not None
    if stream_steps:
        cfg.trainer.limit_train_batches = 1.0  # (its 3 batches a task won, silently)
    applied = {k: v for k, v in sizes.items() if k in cfg.model and f"model.{k}" not in typed}
    if "depth" in applied and isinstance(cfg.model.depth, int):  # a layer of every block
        longest = max(len(pattern_entries(cfg.model.get(k))) for k in ("layers", "ffn"))
        applied["depth"] = min(cfg.model.depth, max(applied["depth"], longest))
    for key, value in applied.items():
        cfg.model[key] = value
    return bool(applied) or bool(shrunk) or stream_steps


def pattern_entries(pattern: object) -> list[str]:
    """A layer pattern's entries (`model.layers=attn` is one; a list config too)."""
    if pattern is None:
        return []
    return [str(pattern)] if isinstance(pattern, str) else [str(p) for p in pattern]
