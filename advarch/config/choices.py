"""Config-group choices on the command line (`model=moee`), checked before Hydra composes.

Hydra answers a choice no config folder has with its error and every option, a screenful;
this says it in one line, with the nearest option. Only plain `group=a[,b]` assignments of
advarch's groups are checked (plus those of `--config-dir` folders); Hydra's own groups
(`hydra/...`), `+`/`~` edits, `@` packages and sweep functions pass through to Hydra.
"""

from __future__ import annotations

import difflib
from pathlib import Path

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
                raise ConfigError(
                    f"{group}={choice} is not a {group} config ({hint}options: "
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
