"""Finding checkpoints and W&B ids of earlier runs, for `ckpt_path=auto` and resumes."""

from __future__ import annotations

from pathlib import Path

from advarch.config.validate import ConfigError

WANDB_ID_FILE = "wandb_id.txt"


def latest_checkpoint(runs_dir: Path) -> Path | None:
    """The newest `checkpoints/last.ckpt` below `runs_dir` (one run name's folder), if any."""
    candidates = list(runs_dir.glob("*/checkpoints/last.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def resolve_checkpoint(ckpt_path: str | None, runs_dir: Path) -> Path | None:
    """`None` → fresh start; `auto` → newest last.ckpt of this run name (or fresh); else a file."""
    if ckpt_path is None:
        return None
    if ckpt_path == "auto":
        return latest_checkpoint(runs_dir)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path!r} is not a file")
    return path


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint lives in (`<run>/checkpoints/x.ckpt` → `<run>`)."""
    return (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    )


def previous_wandb_id(checkpoint: Path | None) -> str | None:
    """The W&B run id saved by the run that wrote `checkpoint`, so a resume continues it."""
    if checkpoint is None:
        return None
    file = run_dir_of(checkpoint) / WANDB_ID_FILE
    return file.read_text().strip() if file.is_file() else None
