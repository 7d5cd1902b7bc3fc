"""Config-group choices and keys on the command line (`model=moee`, `model.dimm=64`), checked
before Hydra runs.

Hydra answers a choice no config folder has with its error and every option, a screenful, and
a key the config lacks with advice to append it (`+model.dimm=64`), which the run then rejects;
these say it in one line, with the nearest option or key. Only plain `group=a[,b]` assignments
are checked: of advarch's groups (plus those of `--config-dir` folders) and of Hydra's
`hydra/...` groups (with its plugins' options); `+`/`~` edits, `@` packages and sweep
functions pass through to Hydra; keys are
checked for single runs of the packaged configs, where a `+key` must add to a top-level key the
config has (`+modle.dim=3` would be read by nothing), a block's options (`model.swa.*`) need
a layer of that block in the model's layer pattern, and an option of one mode needs that mode
(`strategy.gamma`: `strategy.mode=online`).
"""

from __future__ import annotations

import difflib
import json
import re
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigTypeError

from advarch.config.combinations import PACKAGE_CONFIGS, packaged_config
from advarch.config.compose import check_yaml, compose_packaged, pattern_entries
from advarch.errors import ConfigError

if TYPE_CHECKING:
    from hydra._internal.config_repository import ConfigRepository

MODEL = "advarch.models.Model"
# block → the layer pattern (`model.<key>`) whose entries name it, for the blocks with options
# (`model.swa.window`); `advarch.models.registry` (which imports torch) holds the same, tested
PATTERN_BLOCKS = {"swa": "layers", "ssm": "layers", "ssd": "layers", "moe": "ffn"}
# option → (the key whose value makes it read, that value): typed under another value, nothing
# reads it (a config that lists it, as ewc_permuted_digits lists gamma, is not refused)
READ_WITH = {"strategy.gamma": ("strategy.mode", "online")}
# keys whose swept values decide what reads other options: each value is checked (`_trials`)
SWEPT_READERS = {"model.layers", "model.ffn", "model.depth", "model.encoder_depth",
                 *(key for key, _ in READ_WITH.values())}  # fmt: skip
# other libraries' names for keys (no spelling is near): the key a did-you-mean names
ALIASES = {"learning_rate": "lr", "epochs": "max_epochs", "steps": "max_steps",
           "num_layers": "depth", "n_layers": "depth", "hidden_size": "dim", "d_model": "dim",
           "n_heads": "num_heads", "num_attention_heads": "num_heads"}  # fmt: skip
# the programs that read a training run's checkpoint → what they do with it: a training group
# on their command line (`eval.py model=ssm`) is refused, saying the checkpoint's own is used
CHECKPOINT_PROGRAMS = {
    "eval": "eval.py evaluates",
    "generate": "scripts/generate.py samples from",
    "merge": "scripts/merge.py keeps",
}


def check_config_dirs(argv: list[str]) -> None:
    """Raise `ConfigError` for a `--config-dir` that is not a folder: Hydra would search
    nothing there, and the options meant to come from it would be called unknown."""
    for folder in _config_dirs(argv):
        if not folder.is_dir():
            state = "is a file, not a folder" if folder.exists() else "does not exist"
            raise ConfigError(f"--config-dir {folder} {state}")


def check_override_syntax(argv: list[str]) -> None:
    """Raise `ConfigError` for an override Hydra's grammar cannot read, with a hint that reads
    when followed: Hydra answered with its parser's `mismatched input '(' expecting <EOF>` and
    a link, or a screenful.

    - `prompt=def f(x):` (parentheses read as a function call): quote the value;
    - `model.layers=[ssm,attn` (an unclosed list): the `]` it lacks;
    - `bench_overrides=[debug=tiny,model.dim=3]` (`=` inside a list): quote each element;
    - `model.depth` (no `=`): write `model.depth=<value>`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in _overrides(argv):
        try:
            parser.parse_overrides([override])
        except OverrideParseException as err:
            raise _unreadable(override, str(err).splitlines()[0], parser) from None


def check_launcher_at_hand(argv: list[str]) -> None:
    """Raise `ConfigError` for `hydra/launcher=slurm` where SLURM's commands are not on PATH:
    submitit stopped in a 25-line traceback ("Could not detect srun"), its sweep folder left."""
    import shutil

    if "hydra/launcher=slurm" in argv:
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise ConfigError(
                f"hydra/launcher=slurm submits to a SLURM cluster, and this machine has no "
                f"{missing[0]} on PATH: run it on the cluster's login node, or here without it "
                "(hydra/launcher=local_parallel runs the trials side by side)"
            )


def check_single_run(argv: list[str]) -> None:
    """Raise `ConfigError` for a sweep's values (`model.depth=2,4`, `range(2,5)`, an
    `interval(…)`) in a run without `-m`: Hydra's "Ambiguous value for argument", five lines
    and HYDRA_FULL_ERROR. After
    `check_group_choices`, which names a misspelt option among them (`strategy=naive,ewcc`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    multirun = any(
        a in ("-m", "--multirun", "--config-dir", "-cd") or a.startswith(_MULTIRUN_SETTINGS)
        for a in argv
    )  # (a config folder of the user's may set hydra.mode: MULTIRUN as hparams_search does)
    if multirun:
        return
    parser = OverridesParser.create()
    for override in _overrides(argv):
        parsed = parser.parse_override(override)
        if parsed.is_interval_sweep():
            raise ConfigError(
                f"{override} is a search interval: sample it with -m hparams_search=optuna, or "
                f"give {parsed.key_or_group} one value"
            )
        if parsed.is_sweep_override():  # (`a,b`, choice(…), range(…), glob(…))
            raise ConfigError(
                f"{override} is a sweep (one run per value): add -m to run the sweep, or give "
                f"{parsed.key_or_group} one value"
            )


def _overrides(argv: list[str]) -> list[str]:
    """The overrides of a command line: not its flags, nor a flag's value (`-cd conf`)."""
    return [
        a for i, a in enumerate(argv)
        if not a.startswith("-") and not (i and argv[i - 1].startswith("-") and "=" not in a)
    ]  # fmt: skip


# overrides that make a run a multirun (hparams_search's configs set hydra.mode: MULTIRUN)
_MULTIRUN_SETTINGS = ("hydra.mode=", "hparams_search=", "+hparams_search=")


def _unreadable(override: str, reason: str, parser: Any) -> ConfigError:
    """The one line for an override the grammar cannot read, with the first fix the grammar
    reads (each hint is parsed before it is given)."""
    from hydra.errors import OverrideParseException

    def reads(candidate: str) -> bool:
        try:
            parser.parse_overrides([candidate])
        except OverrideParseException:
            return False
        return True

    if "=" not in override:
        return ConfigError(f"{override} has no value: write {override}=<value>")
    key, value = override.split("=", 1)
    missing = "".join(
        close * (value.count(open_) - value.count(close))
        for open_, close in ("[]", "{}")
        if value.count(open_) > value.count(close)
    )
    if missing and reads(f"{override}{missing}"):
        return ConfigError(
            f"{override}: the {'list' if missing[0] == ']' else 'mapping'} has no closing "
            f"{missing}: write {key}={value}{missing}"
        )
    if value.startswith("[") and value.endswith("]") and "=" in value:
        elements = [e.strip().strip("\"'") for e in value[1:-1].split(",")]
        quoted = f"{key}=[{','.join(json.dumps(e) for e in elements)}]"
        if reads(quoted):
            return ConfigError(
                f"{override}: Hydra cannot read a list element with = in it unquoted; quote "
                f"each element, for Hydra and the shell: '{quoted}'"
            )
    inner = "'" if '"' in value else '"'
    quoted = f"{key}={inner}{value}{inner}"
    hint = f"; quote it for Hydra and the shell: '{quoted}'" if reads(quoted) else ""
    if value.startswith(("[", "{")):  # (quoted, a list would be one string)
        hint = ""
    return ConfigError(f"{override}: Hydra cannot read this value ({reason}){hint}")


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
        if group.startswith("hydra.") or "@" in group or any(c in value for c in "()*$"):
            continue
        # option → its file (a `--config-dir` file, searched first by Hydra, over ours)
        files = {_option(p, f / group): p for f in folders for p in (f / group).rglob("*.yaml")}
        if group.startswith("hydra/"):  # (Hydra's and its plugins' options: no file to check)
            files = dict.fromkeys(_hydra_repository().get_group_options(group), None) | files
        if files and value.lstrip().startswith("{"):  # (Hydra merges it into the group's keys)
            _check_mapping(override, group, files)
            continue
        for choice in (v.strip() for v in value.split(",")):
            if files and choice == "null" and not group.startswith("hydra/"):  # (~hydra/x fails)
                raise ConfigError(f"{group}=null is not a choice: write ~{group} to leave it out")
            if files and choice not in files:
                close = difflib.get_close_matches(choice, sorted(files), n=1)
                hint = f"did you mean {group}={close[0]}? " if close else ""
                article = "an" if group[0] in "aeiou" else "a"
                raise ConfigError(
                    f"{group}={choice} is not {article} {group} config ({hint}options: "
                    f"{', '.join(sorted(files))})"
                )
            if files.get(choice) is not None:  # (each of a sweep's jobs: a parser traceback)
                check_yaml(files[choice])


GLOBAL_PACKAGE = "@package _global_"  # (experiment=, debug=: options that set keys anywhere)


def _check_mapping(override: str, group: str, files: dict[str, Path | None]) -> None:
    """`group={key: value, …}` sets those keys of the group's chosen option (Hydra merges
    it); a group whose options set keys anywhere (`experiment`) or Hydra's own (`hydra/…`)
    has no node to merge into (Hydra: "Could not override"): one line instead."""
    what = f"{group} is a config group (options: {', '.join(sorted(files))})"
    if group.startswith("hydra/"):
        raise key_by_key(override, what, group.replace("/", "."))
    if any(p is not None and GLOBAL_PACKAGE in p.read_text() for p in files.values()):
        raise ConfigError(f"{override}: {what} whose options set keys all over the config: "
                          f"choose one, {group}=<option>")  # fmt: skip


def key_by_key(override: str, what: str, key: str) -> ConfigError:
    """The one line for a whole mapping typed where keys are set one at a time
    (`hydra/launcher={n_jobs: 2}`): `what` the key is, then the mapping written out key by key
    under `key` (`hydra.launcher.n_jobs=2`), quoted for a shell."""
    typed = mapping_overrides(key, override.split("=", 1)[1]) or [f"{key}.<key>=…"]
    return ConfigError(f"{override}: {what}; set its keys one at a time: "
                       f"{' '.join(map(shlex.quote, typed))}")  # fmt: skip


def mapping_overrides(key: str, value: str) -> list[str] | None:
    """A mapping typed as one value (`{a: 1, b: [x, y]}`) as an override of each of its keys
    under `key` (`key.a=1`, `key.b=[x, y]`); None where `value` is no mapping."""
    import yaml

    try:
        mapping = yaml.safe_load(value)
    except yaml.YAMLError:
        return None
    if not isinstance(mapping, dict):
        return None
    return [f"{key}.{k}={hydra_value(v)}" for k, v in mapping.items()]


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar: `true`, `null`, `[a, b]`, `{k: v}`, and a string
    quoted where it would read as something else (`'64'`, `'a, b'`)."""
    import yaml

    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if not isinstance(value, str):
        return json.dumps(value)  # (true, false, null, numbers)
    if re.fullmatch(r"[\w./:@*+-]+", value) and yaml.safe_load(value) == value:
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hydra_repository() -> ConfigRepository:
    """The configs Hydra searches: ours, Hydra's (`hydra/launcher`, `hydra/sweeper`, …) and its
    plugins' (stored as they load)."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.utils import create_config_search_path
    from hydra.core.plugins import Plugins

    from advarch.config.validate import import_from_working_dir

    import_from_working_dir()  # (a project's own hydra_plugins/, as Hydra will see them)
    Plugins.instance()  # (plugins store their configs, e.g. hydra/launcher/joblib, on loading)
    return ConfigRepository(create_config_search_path(str(PACKAGE_CONFIGS)))


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
    """Raise `ConfigError` for a `key=value` whose key the composed config does not have, or a
    `+key=value` that adds a top-level key nothing reads, naming the nearest key and all of
    them, for options of a block no layer of the model has (`unused_block`), or a config file
    it loads that is not YAML. Config folders (`--config-dir`) are searched as Hydra would;
    a sweep (`-m`) is checked trial by trial (`_trials`); runs with other flags are left to
    Hydra, and so is anything this check cannot decide."""
    try:
        _check_override_keys(argv, config_name)
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001  (a check must never be the thing that fails)
        return


def _check_override_keys(argv: list[str], config_name: str) -> None:
    folders = _config_dirs(argv)
    flags = [
        a for a in argv
        if a.startswith("-") and a not in ("-m", "--multirun") or a.startswith("hydra.searchpath")
    ]  # fmt: skip
    if len(flags) > len(folders):  # any flag but `--config-dir` and `-m`
        return
    searchpath = [f"hydra.searchpath=[{','.join(f'file://{f.resolve()}' for f in folders)}]"]
    overrides = (searchpath if folders else []) + [
        a for a in argv if "=" in a and not a.startswith("-")
    ]
    if not overrides:
        return
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = list(zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True))
    trials = _trials(parsed)
    unused, configs = [], []
    for swept, trial in trials:
        try:
            cfg, error = _check_trial(trial, config_name, folders, len(trials) > 1)
        except ConfigError as err:
            raise ConfigError(
                f"{err} — in the sweep's trials with {swept}" if swept else str(err)
            ) from None
        unused.append(error)
        configs.append(cfg)
    if all(unused):  # a sweep may set a block's options for the trials whose pattern has it
        message = str(unused[0])
        for text, override in parsed:  # (an interval's trials hold `key=null`)
            if override.is_interval_sweep():
                message = message.replace(f"{override.get_key_element()}=null", text)
        raise ConfigError(message)
    _check_intervals(parsed, config_name, configs[0])


def _check_intervals(parsed: list[tuple[str, Any]], config_name: str, cfg: DictConfig) -> None:
    """Raise `ConfigError` for an `interval(…)` the sweeper cannot sample: the grid sweeper
    enumerates values (Hydra: a traceback), and Optuna samples floats, which a key holding an
    int refuses in every trial (`model.dim=interval(16,32)`: `int(interval(16,32))`). `parsed`:
    the overrides as typed and as Hydra parses them; `cfg`: the first trial's config."""
    intervals = [(t, o) for t, o in parsed if o.is_interval_sweep()]
    if not intervals:
        return
    if str(OmegaConf.select(cfg, "hydra.sweeper._target_")).endswith("BasicSweeper"):
        text, override = intervals[0]
        raise ConfigError(
            f"{text}: a grid sweep runs listed values ({override.key_or_group}=a,b,c or "
            "range(…)); an interval is sampled by hparams_search=optuna"
        )
    sampled = {t for t, _ in intervals}  # the config's own values, for their types
    kept = [t for t, _ in parsed if t not in sampled and t[0] != "+"]
    own = compose_packaged(kept, config_name)
    for text, override in intervals:
        key, interval = override.key_or_group, override.value()
        current = OmegaConf.select(own, key)
        if isinstance(interval.start, float) and type(current) is int:
            raise ConfigError(
                f"{text}: {key} takes an int ({key}={current}) and an interval samples floats; "
                f"write {key}=int(interval({interval.start:g},{interval.end:g}))"
            )


def _trials(parsed: list[tuple[str, Any]]) -> list[tuple[str, list[str]]]:
    """The command lines of a sweep's trials to check, each with the swept values that pick it
    (`model=ssm`): each value of a swept config group or `SWEPT_READERS` key (`model=moe,ssm`,
    `model.layers=[attn],[attn,swa]`, `strategy.mode=separate,online`) once, the other sweeps
    at their first value, whose keys are those of every value (an `interval` as null); a single
    run's overrides as they are. `parsed`: each override as typed and as Hydra parses it."""
    first, options = [], []
    for text, override in parsed:
        if not override.is_sweep_override():
            first.append(text)
            options.append([])
            continue
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []
        first.append(f"{key}={values[0] if values else 'null'}")
        varied = "." not in key or key.lstrip("+") in SWEPT_READERS
        options.append([f"{key}={v}" for v in values[1:]] if varied else [])
    picked = " ".join(first[i] for i, others in enumerate(options) if others)
    trials = [(picked, first)]
    for i, others in enumerate(options):
        trials += [(other, [*first[:i], other, *first[i + 1 :]]) for other in others]
    return trials


def _check_trial(
    overrides: list[str], config_name: str, folders: list[Path], sweep: bool
) -> tuple[DictConfig, ConfigError | None]:
    """Raise `ConfigError` for a key of one run's `overrides` that its config lacks (`sweep`:
    one trial of several, whose configs may differ); returns its config (the `+` edits aside)
    and the `unused_block` error of its first override that sets a block no layer has, if any."""
    assigned = [o for o in overrides if not o.startswith("+")]  # (`+` edits always compose)
    cfg, key, lacked = _compose_or_unknown_key(assigned, config_name)
    if key is not None:
        cfg = compose_packaged([o for o in assigned if o.split("=", 1)[0] != key], config_name)
        parts, depth = lacked.split("."), 0  # the first part the config lacks
        while depth < len(parts) - 1 and isinstance(
            OmegaConf.select(cfg, ".".join(parts[: depth + 1])), DictConfig
        ):
            depth += 1
        parent, leaf = ".".join(parts[:depth]), parts[depth]
        node = OmegaConf.select(cfg, parent) if parent else _accepted_keys(cfg)
        if leaf not in node:
            unknown = unknown_key(
                parent, leaf, node, None if parent else f"the {config_name} config"
            )
            if parent and _takes_keyword(node, parent, leaf):  # (its YAML leaves it out)
                override = next(o for o in assigned if o.split("=", 1)[0] == key)
                adding = override if lacked == key else f"{lacked}=…"  # (in a mapping: its key)
                keys = ", ".join(sorted(str(k) for k in node if not str(k).startswith("_")))
                raise ConfigError(f"{lacked} is not a key of {parent} (keys: {keys}) but a "
                                  f"keyword of {node['_target_']}: +{adding} adds it")  # fmt: skip
            own = CHECKPOINT_PROGRAMS.get(config_name)
            if parent or own is None or leaf not in _packaged_groups():
                raise unknown
            override = next(o for o in assigned if o.split("=", 1)[0] == key)
            if config_name == "eval" and leaf == "strategy":  # (`eval.checkpoint_overrides`)
                unknown = ConfigError("change its keys with strategy.<key>=…")
            raise ConfigError(f"{override}: {own} the checkpoint's own {leaf}; {unknown}")
        if node[leaf] is None:  # a null section (`model.swa` of model=transformer): `+` sets it
            override = next(o for o in assigned if o.split("=", 1)[0] == key)
            error = unused_block(override, cfg) or null_section(override, f"{parent}.{leaf}", cfg)
            if sweep:  # (`+` would fail in the trials whose config has the key)
                error = ConfigError(f"{error}; in a sweep over configs with and without it, "
                                    f"++{override} sets it in every trial")  # fmt: skip
            raise error
    groups = {p.name for f in [PACKAGE_CONFIGS, *folders] if f.is_dir() for p in f.iterdir()}
    chosen = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    for override in (o for o in overrides if o.startswith("+")):
        added, value = override.lstrip("+").split("=", 1)
        root = added.split(".")[0].split("@")[0]
        if added in chosen and not override.startswith("++"):  # Hydra: "Multiple values for"
            raise ConfigError(f"+{added}={value}: {added} is a choice the {config_name} config "
                              f"already makes; write {added}={value}")  # fmt: skip
        if not override.startswith("++") and _has_key(cfg, added):  # Hydra: "already at"
            owner = chosen.get(root)
            where = f"{root}={owner}" if owner else f"the {config_name} config"
            raise ConfigError(f"+{added}={value}: {where} has {added} already; write "
                              f"{added}={value}" + (f" (or ++{added}={value} where some trials' "
                              "configs lack it)" if sweep else ""))  # fmt: skip
        # `+experiment=…` adds a config group; a key under a group the config does not take
        # (`+trainer.limit_test_batches=…` for eval.py) would add a node nothing reads
        accepted = _accepted_keys(cfg)
        if root not in cfg and (root not in groups or "." in added and root not in accepted):
            unknown = unknown_key("", root, accepted, f"the {config_name} config")
            raise ConfigError(f"+{added}: {unknown}")
    unused = (unused_block(o, cfg) or unused_option(o, cfg) for o in overrides)
    return cfg, next((error for error in unused if error), None)


def _takes_keyword(node: Any, key: str, name: str) -> bool:
    """Whether config `node` (at `key`) builds a `_target_` that takes the keyword `name`."""
    from advarch.config.validate import takes_option

    if not isinstance(node, DictConfig) or "_target_" not in node:
        return False
    try:
        return takes_option(node, key, name)
    except ConfigError:  # (a target that cannot be imported: Hydra's to report)
        return False


def _has_key(cfg: DictConfig, dotted: str) -> bool:
    """Whether `cfg` has the key `dotted` (null or not), as Hydra's `+` append sees it."""
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def null_section(override: str, section: str, cfg: DictConfig) -> ConfigError:
    """The one line for an override inside a null section (`data.retrieval.num_neighbours=4`
    on data=text): the options of its group that have the section, where one does (they hold
    it whole, with the keys that go with it: data=text_retrieval bounds its corpus and its
    search for debug=tiny); `+` where none does, and for a block's options, whose unset keys
    take the block's defaults."""
    group, _, inner = section.partition(".")
    choice = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}") if inner else None
    options = [] if choice is None or group == "model" and inner in PATTERN_BLOCKS else [
        o for o in _packaged(group)
        if o != choice and _select(packaged_config(group, o), inner) is not None
    ]  # fmt: skip
    if not options:
        return _unknown_block_option(override, section) or ConfigError(
            f"{override}: {section} is null in this config; write +{override} to set it"
        )
    named = " or ".join(f"{group}={o}" for o in options)
    return ConfigError(
        f"{override}: {section} is null in {group}={choice}; {named} "
        f"{'has' if len(options) == 1 else 'have'} it: write {group}={options[0]} {override}"
    )


def _unknown_block_option(override: str, section: str) -> ConfigError | None:
    """The one line for an option a null block section does not have (`model.ssm.d_stat=4`),
    with the nearest of the options the packaged models write under it, which are all of the
    block's (tests/config/test_choices.py holds them to the block's config): `+` would only
    have the run refuse it later. None for one of its options and other keys."""
    group, _, block = section.partition(".")
    key = override.lstrip("+").split("=", 1)[0]
    if group != "model" or block not in PATTERN_BLOCKS or key.count(".") != 2:
        return None
    options = sorted({k for m in _packaged("model")
                      for k in (packaged_config("model", m).get(block) or {})})  # fmt: skip
    leaf = key.rsplit(".", 1)[1]
    if leaf in options:
        return None
    close = difflib.get_close_matches(leaf, options, n=1)
    hint = f"did you mean {section}.{close[0]}? " if close else ""
    return ConfigError(f"{override}: {leaf} is not an option of {section} "
                       f"({hint}options: {', '.join(options)})")  # fmt: skip


def _select(config: Any, dotted: str) -> Any:
    """The value at `dotted` of nested mappings (None where absent)."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def unused_block(override: str, cfg: DictConfig) -> ConfigError | None:
    """The one line for an override of a block's options (`+model.swa.window=32`) that no
    layer of the model would read: its layer pattern names no such block. None where one does,
    for other keys, a null value and a model other than advarch's `Model`."""
    key, value = override.lstrip("+").split("=", 1)
    parts = key.split(".")
    model = cfg.get("model")
    if (
        len(parts) < 2
        or parts[0] != "model"
        or parts[1] not in PATTERN_BLOCKS
        or value == "null"
        or not isinstance(model, DictConfig)
        or model.get("_target_") != MODEL
    ):
        return None
    block, pattern = parts[1], PATTERN_BLOCKS[parts[1]]
    patterns = {k: pattern_entries(model.get(k)) for k in ("layers", "ffn")}
    if block in patterns[pattern]:
        return _dropped_by_depth(override, block, pattern, patterns[pattern], model)
    used = [b for b in dict.fromkeys(patterns["layers"] + patterns["ffn"]) if b != "none"]
    choice = OmegaConf.select(cfg, "hydra.runtime.choices.model")
    which = f"model={choice}" if choice else "the model"
    shown = ", ".join(f"model.{k}=[{','.join(v)}]" for k, v in patterns.items())
    others = [m for m in _packaged("model")
              if block in pattern_entries(packaged_config("model", m).get(pattern))]  # fmt: skip
    instead = " or ".join(f"model={m}" for m in others if m != choice)
    plus = "+" if model.get(block) is None else ""  # (a null section takes its keys with +)
    added = f"model.{pattern}=[{','.join([*patterns[pattern], block])}] {plus}{key}={value}"
    return ConfigError(
        f"{override}: {which}'s layer pattern uses the blocks {', '.join(used) or 'none'} "
        f"({shown}) and no {block} block, so nothing would read model.{block}; add {block} to "
        f"model.{pattern} ({added})" + (f", or use {instead}" if instead else "")
    )


def unused_option(override: str, cfg: DictConfig) -> ConfigError | None:
    """The one line for an override of a `READ_WITH` option that the config's value of the key
    it goes with leaves unread (`strategy.gamma=0.9` with `strategy.mode=separate`); None for
    other keys and where it is read."""
    key, value = override.lstrip("+").split("=", 1)
    if key not in READ_WITH:
        return None
    mode_key, mode = READ_WITH[key]
    if OmegaConf.select(cfg, mode_key) in (None, mode):
        return None
    return ConfigError(f"{key}={value} applies with {mode_key}={mode} (add {mode_key}={mode})")


def _dropped_by_depth(override: str, block: str, pattern: str, entries: list[str],
                      model: DictConfig) -> ConfigError | None:  # fmt: skip
    """The one line for a block's options whose block the model's depth cuts from its cycled
    pattern (`model=hybrid model.depth=2`: [ssm,attn,ssm,swa] → [ssm,attn]); None otherwise."""
    depths = [model.get(k) for k in ("depth", "encoder_depth")]
    if not all(d is None or isinstance(d, int) for d in depths) or depths[0] is None:
        return None
    depth = max(d for d in depths if d is not None)
    if block in entries[:depth]:
        return None
    keys = zip(("depth", "encoder_depth"), depths, strict=True)
    named = " and ".join(f"model.{k}={d}" for k, d in keys if d is not None)
    return ConfigError(
        f"{override}: {named} cycles model.{pattern}=[{','.join(entries)}] to "
        f"[{','.join(entries[:depth])}], which has no {block} layer, so nothing would read "
        f"model.{block}; raise model.depth to {entries.index(block) + 1} or put {block} earlier "
        f"in model.{pattern}"
    )


def _packaged(group: str) -> list[str]:
    """The packaged options of a config group, sorted."""
    return sorted(p.stem for p in (PACKAGE_CONFIGS / group).glob("*.yaml"))


def check_overrides(argv: list[str], config_name: str) -> None:
    """Raise `ConfigError` for a config folder, group choice or key of `argv` that
    `config_name`'s configs lack (the checks above, in order)."""
    check_config_dirs(argv)
    check_override_syntax(argv)
    check_group_choices(argv)
    check_single_run(argv)
    check_override_keys(argv, config_name)


def check_command_line(argv: list[str], config_name: str) -> None:
    """A program's command line against its own config (`eval`, `generate`, `merge`):
    `check_overrides`; exit with one `error: …` line."""
    try:
        check_overrides(argv, config_name)
    except ConfigError as err:
        sys.exit(f"error: {err}")


def _own_keys(cfg: DictConfig) -> list[str]:
    """The top-level keys of a composed config, Hydra's own node aside."""
    return [str(k) for k in cfg if k != "hydra"]


def _accepted_keys(cfg: DictConfig) -> list[str]:
    """The top-level keys a command line may set: the config's own (`_own_keys`) and its
    config groups, a group chosen as null (eval's `data`) too."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    groups = [str(g) for g in choices if g != "hydra" and "/" not in str(g)]
    return list(dict.fromkeys(_own_keys(cfg) + groups))


def _packaged_groups() -> set[str]:
    """The packaged config groups (`model`, `strategy`, `trainer`, …)."""
    return {p.name for p in PACKAGE_CONFIGS.iterdir() if p.is_dir() and p.name != "__pycache__"}


def unknown_key(parent: str, leaf: str, node: Iterable, owner: str | None = None) -> ConfigError:
    """`<parent>.<leaf> is not a key of <owner> (did you mean …? keys: …)`, the keys `node`
    has (its private `_…` ones aside) and the nearest one; `owner` defaults to `parent`
    (a top-level key: `parent` is "")."""
    keys = sorted(str(k) for k in node if not str(k).startswith("_"))
    prefix = f"{parent}." if parent else ""
    # values unresolved: an interpolation (`${paths.cache_dir}`) may need Hydra's runtime
    raw = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else {}
    nested = [f"{k}.{leaf}" for k in keys if isinstance(raw.get(k), dict) and leaf in raw[k]]
    alias = [ALIASES[leaf]] if ALIASES.get(leaf) in keys else []  # (lr for learning_rate)
    close = nested or alias or difflib.get_close_matches(leaf, keys, n=1)  # model.moe.top_k
    hint = f"did you mean {prefix}{close[0]}? " if close else ""
    if not close and (having := _options_with(parent, leaf)):  # strategy=ewc for ewc_lambda
        verb = "has" if len(having) == 1 else "have"
        hint = f"{' or '.join(having)} {verb} it; "
    listed = f"keys: {', '.join(keys)}" if keys else f"{owner or parent} has no keys"
    return ConfigError(f"{prefix}{leaf} is not a key of {owner or parent} ({hint}{listed})")


def _options_with(parent: str, key: str) -> list[str]:
    """`group=option` for each option of the config group at `parent` (packaged, or Hydra's
    `hydra.launcher` and `hydra.sweeper`) that has the top-level `key`."""
    if parent.startswith("hydra."):
        group = parent.replace(".", "/")
        repository = _hydra_repository()
        loaded = {
            o: repository.load_config(f"{group}/{o}") for o in repository.get_group_options(group)
        }
        return [f"{group}={o}" for o, c in loaded.items() if c is not None and key in c.config]
    if parent not in _packaged_groups():
        return []
    options = sorted(p.stem for p in (PACKAGE_CONFIGS / parent).glob("*.yaml"))
    return [f"{parent}={o}" for o in options if key in packaged_config(parent, o)]


def _compose_or_unknown_key(
    overrides: list[str], config_name: str
) -> tuple[DictConfig | None, str | None, str | None]:
    """(the composed config, None, None), or (None, the dotted key of the override Hydra could
    not apply, the key the config lacks: that one, or one in the mapping it gives,
    `trainer.foo` of `trainer={foo: 1}`); any other composition error raises (Hydra's)."""
    try:
        return compose_packaged(overrides, config_name), None, None
    except ConfigCompositionException as err:
        found = re.match(r"Could not override '([^']+)'", str(err))
        if found is None:
            mismatched = _mismatched_shape(err)
            if mismatched is None:
                raise
            raise mismatched from None
        key, lacked = found.group(1), str(getattr(err.__cause__, "full_key", None) or "")
        return None, key, lacked if lacked.startswith(f"{key}.") else key


def _mismatched_shape(err: ConfigCompositionException) -> ConfigError | None:
    """`key=value` giving a mapping where the config holds a list, or the reverse (Hydra's
    five lines: "Cannot merge DictConfig with ListConfig"), in one line; None for others."""
    cause = err.__cause__
    if not isinstance(cause, ConfigTypeError) or not str(cause).startswith("Cannot merge"):
        return None
    override = str(err).removeprefix("Error merging override ")
    holds, given = ("a list", "a mapping") if cause.object_type is list else ("a mapping", "a list")
    return ConfigError(f"{override}: {cause.full_key} holds {holds}, and this gives {given}")
