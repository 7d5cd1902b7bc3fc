"""Reading advarch checkpoints: one loader, one-line errors that name the file.

Every entry point that reads a checkpoint (training's resume and `ckpt_path=auto`, eval,
generation, merging, the finetune base and its delta) goes through `read_checkpoint` (its
file checks, `checkpoint_file`, also run alone before torch is imported), so a missing, empty,
truncated, damaged or foreign file is always one line naming the file and the key the user
set, never a torch traceback nor weights read wrong (torch does not check the archive's
checksums: `check_checksums` does, once per file version).
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from advarch.errors import ConfigError

if TYPE_CHECKING:  # (torch is imported where it is used: `checkpoint_file` checks run first)
    import torch

PREFIX = "model."  # state-dict names of the LightningModule's model in every advarch checkpoint
TOKENIZER = "tokenizer"  # the entry of text checkpoints: their data's `tokenizer_state`
# The first bytes of what `torch.save` writes: a zip archive, or (before torch 1.6, or with
# `_use_new_zipfile_serialization=False`) a pickle stream of protocol 2.
TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80\x02")
# Strategy keys of runs from before the optimizer and scheduler groups → the group holding each
# now, and what those runs used: AdamW with a cosine schedule.
MOVED_STRATEGY_KEYS = {
    "lr": "optimizer",
    "weight_decay": "optimizer",
    "betas": "optimizer",
    "warmup_steps": "scheduler",
    "min_lr_ratio": "scheduler",
}
LEGACY_TARGETS = {
    "optimizer": "torch.optim.AdamW",
    "scheduler": "advarch.strategies.optimization.cosine",
}


class CheckpointError(ConfigError):
    """A checkpoint file is missing, unreadable or not an advarch checkpoint (a bad input: the
    entry points print it as one `error:` line, like any ConfigError)."""


def read_checkpoint(
    path: str | os.PathLike,
    key: str = "ckpt_path",
    require: str | None = "state_dict",
    mmap: bool = False,
) -> dict[str, Any]:
    """The checkpoint dict at `path`.

    Args:
        path: the file.
        key: the config key (or label) that named it, for the error message.
        require: an entry the dict must have (None: any dict).
        mmap: keep tensors on disk until read (large checkpoints read tensor by tensor).

    Raises:
        CheckpointError: one line naming `key` and the file: `checkpoint_file`'s, truncated
            or damaged, not a dict, or without `require`.
    """
    import torch

    file = checkpoint_file(path, key)
    where = _named(path, key)
    size = file.stat().st_size
    check_checksums(file, where)
    try:
        # weights_only=False: hyper_parameters hold (trusted, our own) Python objects
        ckpt = torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        # (torch's reason, an OS error's `[Errno 22] Invalid argument` from mmap, tells a user
        # nothing the size does not)
        raise CheckpointError(f"{where} is truncated or not a checkpoint ({size} bytes)") from err
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{where} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if require is not None and require not in ckpt and {"base", "tensors"} <= set(ckpt):
        whole = Path(file).parent / "checkpoints" / "last.ckpt"  # (`<run>/finetuned_delta.pt`)
        raise CheckpointError(
            f"{where} is a fine-tune's delta (its trained tensors and the base it extends, "
            f"{ckpt['base']}); give the fine-tune run's checkpoint, which holds the whole model "
            f"({whole if whole.is_file() else '<run>/checkpoints/last.ckpt'}), or rebuild it in "
            "Python with advarch.strategies.finetune.load_finetuned"
        )
    if require is not None and require not in ckpt:
        raise CheckpointError(
            f"{where} has no {require!r} entry; give an advarch checkpoint "
            "(<run>/checkpoints/last.ckpt)"
        )
    return dict(ckpt)


_CHECKED: set[tuple[str, int, int]] = set()  # (file, size, mtime) whose checksums match


def check_checksums(file: Path, where: str) -> None:
    """Every record of a `torch.save` zip archive against its CRC-32 (bytes changed on disk
    or in a copy load silently as wrong weights otherwise). Read once per file version;
    records saved without one (`torch.serialization.set_crc32_options(False)`: 0) pass."""
    stat = file.stat()
    version = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if version in _CHECKED or not zipfile.is_zipfile(file):
        return  # (not a zip: the pickle format of old torch, without checksums)
    damaged = None
    try:
        with zipfile.ZipFile(file) as archive:
            for record in archive.infolist():
                if record.CRC == 0 and record.file_size:
                    continue
                try:
                    with archive.open(record) as stream:  # read to the end: it checks there
                        while stream.read(1 << 24):
                            continue
                except zipfile.BadZipFile:
                    damaged = record.filename
                    break
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(f"{where} is damaged ({err})") from err
    if damaged is not None:
        raise CheckpointError(
            f"{where} is damaged: its record {damaged} does not match its checksum (changed on "
            "disk or in a copy); use another checkpoint"
        )
    _CHECKED.add(version)


def checkpoint_file(
    path: str | os.PathLike, key: str = "ckpt_path", words: Sequence[str] = ()
) -> Path:
    """The file at `path`, or one CheckpointError line naming `key` and the file: missing, a
    folder, empty, or not written by `torch.save` (a text file: torch's unpickler says
    `Memo value not found at index 101`, or with mmap that the file was not saved with
    `_use_new_zipfile_serialization=True`). Reads a few bytes, without torch: the checks
    before a run imports it use this too. `words`: what `key` takes besides a path (train.py's
    `auto`), suggested for a missing path close to one."""
    file = Path(path).expanduser()
    where = _named(path, key)
    if not file.exists():
        bare = not file.suffix and len(file.parts) == 1  # (auto.ckpt, runs/auto: a path)
        close = difflib.get_close_matches(str(path), words, n=1) if bare else []
        hint = f" (did you mean {key}={close[0]}?)" if close else ""
        if str(path) == "auto":
            hint = " (auto, the newest run's last.ckpt, is train.py's)"
        raise CheckpointError(f"{where} is not a file{hint}")
    if file.is_dir():
        raise CheckpointError(f"{where} is a folder, not a checkpoint file")
    if file.stat().st_size == 0:
        raise CheckpointError(f"{where} is an empty file (0 bytes), not a checkpoint")
    with file.open("rb") as stream:
        if not stream.read(4).startswith(TORCH_FILE_STARTS):
            raise CheckpointError(f"{where} is not a checkpoint file (not a torch.save archive)")
    return file


def _named(path: str | os.PathLike, key: str) -> str:
    """`key='path'` for messages (the path alone without a key)."""
    return f"{key}={str(path)!r}" if key else str(path)


def saved_hparam(ckpt: Mapping[str, Any], name: str) -> Any:
    """What a run stored in its checkpoint's `hyper_parameters` under `name` (`cfg`: its
    resolved config, `spec`: its DataSpec), or None (a checkpoint not written by advarch)."""
    return (ckpt.get("hyper_parameters") or {}).get(name)


def saved_kind(ckpt: Mapping[str, Any]) -> str | None:
    """The task kind (`DataSpec.kind`) a checkpoint's model learnt, or None where unknown."""
    return (saved_hparam(ckpt, "spec") or {}).get("kind")


def saved_config(
    ckpt: Mapping[str, Any], path: str | os.PathLike, key: str = "ckpt_path"
) -> DictConfig:
    """The resolved training config an advarch run stored in its checkpoint."""
    saved = saved_hparam(ckpt, "cfg")
    if saved is None:
        raise CheckpointError(
            f"{key}={str(path)!r} has no saved advarch config (hyper_parameters.cfg); "
            "it was not written by advarch's train.py"
        )
    return with_optimization_groups(OmegaConf.create(saved))


def with_optimization_groups(cfg: DictConfig) -> DictConfig:
    """The saved config of a run from before the optimizer/scheduler groups, its strategy's
    lr, weight_decay, betas, warmup_steps and min_lr_ratio moved to the groups they meant."""
    strategy = cfg.get("strategy")
    if not strategy or "optimizer" in cfg:
        return cfg
    for group, target in LEGACY_TARGETS.items():
        keys = [k for k, g in MOVED_STRATEGY_KEYS.items() if g == group and k in strategy]
        moved = {k: strategy.pop(k) for k in keys}
        cfg[group] = {"_target_": target, "_partial_": True, **moved}
    return cfg


def load_with_config(path: str | os.PathLike, key: str = "ckpt_path") -> tuple[dict, DictConfig]:
    """(checkpoint dict, its saved training config), or one CheckpointError line. A text run
    that tokenised with another checkpoint's tokenizer (a fine-tune: `data.tokenizer_from`, its
    base, which may be gone since) reads it from this one, which carries the same."""
    ckpt = read_checkpoint(path, key)
    saved = saved_config(ckpt, path, key)
    data = saved.get("data")
    if data is not None and data.get("tokenizer_from") and ckpt.get(TOKENIZER):
        data.tokenizer_from = str(path)
    return ckpt, saved


def with_cache_dir(cfg: DictConfig, cache_dir: str) -> DictConfig:
    """A saved config with its caches (`paths.cache_dir`, `data.cache_dir`) in `cache_dir`:
    evaluating or sampling a checkpoint reuses or builds tokenised data where it runs, not in
    the folder the training ran in (which may be elsewhere, or gone)."""
    with open_dict(cfg):
        if cfg.get("paths") is not None:
            cfg.paths.cache_dir = cache_dir
        if cfg.get("data") is not None and "cache_dir" in cfg.data:
            cfg.data.cache_dir = cache_dir
    return cfg


def model_weights(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's tensors of a checkpoint state dict, without the `model.` prefix."""
    return {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}


def load_error(err: RuntimeError) -> str:
    """The first problem `load_state_dict` reports, short: its message lists every missing or
    unexpected key on one line (hundreds for another architecture)."""
    lines = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
    sizes = re.match(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])"
                     r"\) from checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)",
                     lines[0])  # fmt: skip
    if sizes is not None:
        return f"{sizes[1]} is {sizes[2]} in the checkpoint, {sizes[3]} in this model"
    listed = re.match(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)", lines[0])
    if listed is None:
        return lines[0]
    keys = re.findall(r'"([^"]+)"', listed.group(2))
    missing = listed.group(1) == "Missing"
    whose, where = ("model", "checkpoint") if missing else ("checkpoint", "model")
    return f"{len(keys)} tensor(s) of the {whose} are not in the {where} (the first: {keys[0]})"


def check_finite(model: torch.nn.Module, where: str) -> None:
    """CheckpointError naming the first parameter that holds NaN or inf after loading `where`
    (bytes damaged inside an intact archive load without complaint, then every metric is NaN)."""
    name = non_finite_parameter(model)
    if name is not None:
        raise CheckpointError(
            f"{where}: parameter {name!r} holds NaN or inf (a damaged file, or a run that "
            "diverged before it was written)"
        )


def non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, None where all are finite (one
    host-device sync). Buffers are not checked: masks may hold -inf on purpose."""
    import torch

    named = list(model.named_parameters())
    if not named:
        return None
    finite = torch.stack([torch.isfinite(param).all() for _, param in named])
    if bool(finite.all()):
        return None
    return named[int((~finite).nonzero()[0, 0])][0]


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint lives in (`<run>/checkpoints/x.ckpt` → `<run>`)."""
    return (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    )


def describe(ckpt: Mapping[str, Any]) -> str:
    """`step N, epoch E[, task T]` of a training checkpoint, for resume messages."""
    text = f"step {ckpt.get('global_step', '?')}, epoch {ckpt.get('epoch', '?')}"
    continual = ckpt.get("continual")
    if isinstance(continual, Mapping) and "task" in continual:
        text += f", task {continual['task']} ({continual.get('finished_tasks', 0)} finished)"
    return text


def newest_readable(
    candidates: Iterable[Path],
    key: str = "ckpt_path",
    mismatch: Callable[[Mapping[str, Any]], str | None] = lambda ckpt: None,
) -> tuple[Path | None, dict[str, Any] | None, list[str], list[str]]:
    """The newest (by modification time) readable checkpoint among `candidates`.

    Args:
        candidates: checkpoint files.
        key: the config key that asked for them, for messages.
        mismatch: why a readable checkpoint does not fit (None when it does).

    Returns:
        (path, checkpoint, unreadable, foreign): one line per newer file that could not be
        read, and per newer one that did not fit, saying why; path and checkpoint are None
        when none qualifies.
    """
    unreadable: list[str] = []
    foreign: list[str] = []
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            ckpt = read_checkpoint(path, key="", mmap=True)
        except CheckpointError as err:
            unreadable.append(str(err))
            continue
        reason = mismatch(ckpt)
        if reason is None:
            return path, ckpt, unreadable, foreign
        foreign.append(f"{path}: written by another configuration ({reason})")
    return None, None, unreadable, foreign


def ran_with(checkpoint: Path) -> str:
    """` (its run: python train.py <overrides>)`, the command line that made `checkpoint`'s
    run as Hydra recorded it (`.hydra/overrides.yaml`), so that a refusal names the options to
    type (`model=transformer`), quoted for a shell where they need it
    (`'data.curriculum=[{seq_len: 64}]'`); empty where the run folder has no record."""
    import yaml

    run_dir = run_dir_of(checkpoint)
    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return ""
    if not isinstance(overrides, list):
        return ""
    folders = [word for option in config_dir_options(run_dir) for word in option]
    words = ["python", "train.py", *folders, *map(str, overrides)]
    return f" (its run: {shlex.join(words)})"


def config_dir_options(run_dir: Path) -> list[list[str]]:
    """The words of each option by which the run's command line added config folders to
    Hydra's search path (`.hydra/hydra.yaml`), its overrides may choose configs only they
    hold: `--config-dir <folder>`, and `hydra.searchpath=[…]` as typed."""
    import yaml

    try:
        record = yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())
        sources = record["hydra"]["runtime"]["config_sources"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return []
    options = [["--config-dir", str(s["path"])] for s in sources if s["provider"] == "command-line"]
    typed = "hydra.searchpath in command-line"
    searched = [f"{s['schema']}://{s['path']}" for s in sources if s["provider"] == typed]
    return options + ([[f"hydra.searchpath=[{','.join(searched)}]"]] if searched else [])
