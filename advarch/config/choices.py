"""Config-group choices and keys on the command line (`model=moee`, `model.dimm=64`), checked
before Hydra runs.

Hydra answers a choice no config folder has with its error and every option, a screenful, and
a key the config lacks with advice to append it (`+model.dimm=64`), which the run then rejects;
these say it in one line, with the nearest option or key. Only plain `group=a[,b]` assignments
of advarch's groups are checked (plus those of `--config-dir` folders); Hydra's own groups
(`hydra/...`), `+`/`~` edits, `@` packages and sweep functions pass through to Hydra; keys are
checked for single runs of the packaged configs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path

from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from advarch.config.compose import compose_packaged
from advarch.config.validate import ConfigError

PACKAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def check_group_choices(argv: list[str]) -> None:
    """Raise `ConfigError` for a `group=option` whose option no config folder holds.

    The message names the override, the nearest option (when one is close) and all options.
    """
    if any(a.startswith("hydra.searchpath") for a in argv):
        return  # more config folders than this can see
    folders = [PACKAGE_CONFIGS, *_config_dirs(argv)]
    for override in argv:
        if "=" not in override or override.startswith(("-", "+", "~")):
            continue
        group, value = override.split("=", 1)
        if group.startswith("hydra") or "@" in group or any(c in value for c in "()*$"):
            continue
        options = {_option(p, f / group) for f in folders for p in (f / group).rglob("*.yaml")}
        for choice in (v.strip() for v in value.split(",")):
            if options and choice == "null":
                raise ConfigError(f"{group}=null is not a choice: write ~{group} to leave it out")
            if options and choice not in options:
                close = difflib.get_close_matches(choice, sorted(options), n=1)
                hint = f"did you mean {group}={close[0]}? " if close else ""
                article = "an" if group[0] in "aeiou" else "a"
                raise ConfigError(
                    f"{group}={choice} is not {article} {group} config ({hint}options: "
                    f"{', '.join(sorted(options))})"
                )


def _option(path: Path, group_dir: Path) -> str:
    """The choice a config file is (`sub/name` for group_dir/sub/name.yaml)."""
    return path.relative_to(group_dir).with_suffix("").as_posix()


def _config_dirs(argv: list[str]) -> list[Path]:
    """The folders of `--config-dir X`, `--config-dir=X` and `-cd X`."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def check_override_keys(argv: list[str], config_name: str = "train") -> None:
    """Raise `ConfigError` for a `key=value` whose key the composed config does not have,
    naming the nearest key of its parent and all of them. Sweeps (`-m`) and runs with other
    flags or config folders (`--config-dir`) are left to Hydra."""
    if any(a.startswith(("-", "hydra.searchpath")) for a in argv):
        return
    overrides = [a for a in argv if "=" in a]
    if not any("." in o.split("=", 1)[0] for o in overrides):
        return  # group choices (checked above) and top-level keys only: nothing to compose
    key = _unknown_key(overrides, config_name)
    if key is None:
        return
    parent, _, leaf = key.rpartition(".")  # (a dotted key: parent is never empty)
    kept = [o for o in overrides if o.split("=", 1)[0] != key]
    try:
        node = OmegaConf.select(compose_packaged(kept, config_name), parent)
    except Exception:  # the rest does not compose either: Hydra says why
        return
    if not isinstance(node, DictConfig):
        return
    raise unknown_key(parent, leaf, node)


def unknown_key(parent: str, leaf: str, node: Iterable, owner: str | None = None) -> ConfigError:
    """`<parent>.<leaf> is not a key of <owner> (did you mean …? keys: …)`, the keys `node`
    has (its private `_…` ones aside) and the nearest one; `owner` defaults to `parent`."""
    keys = sorted(str(k) for k in node if not str(k).startswith("_"))
    close = difflib.get_close_matches(leaf, keys, n=1)
    hint = f"did you mean {parent}.{close[0]}? " if close else ""
    return ConfigError(
        f"{parent}.{leaf} is not a key of {owner or parent} ({hint}keys: {', '.join(keys)})"
    )


def _unknown_key(overrides: list[str], config_name: str) -> str | None:
    """The dotted key Hydra could not override (absent from the composed config), if any."""
    try:
        compose_packaged(overrides, config_name)
    except ConfigCompositionException as err:
        found = re.match(r"Could not override '([^']+)'", str(err))
        return found.group(1) if found and "." in found.group(1) else None
    except Exception:  # any other composition error is Hydra's to report
        return None
    return None
