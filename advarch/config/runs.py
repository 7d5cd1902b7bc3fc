"""Finding checkpoints and W&B ids of earlier runs, for `ckpt_path=auto` and resumes."""

from __future__ import annotations

import logging
from pathlib import Path

from advarch.checkpoint import describe, newest_readable, read_checkpoint

log = logging.getLogger("advarch")

WANDB_ID_FILE = "wandb_id.txt"


def resolve_checkpoint(ckpt_path: str | None, runs_dir: Path) -> Path | None:
    """The checkpoint a run resumes from, and a log line saying which (or why none).

    `None` → fresh start; `auto` → the newest readable checkpoint of this run name
    (`<runs_dir>/*/checkpoints/*.ckpt`, newest first; unreadable ones are skipped with a
    warning); anything else must be a readable checkpoint file (one CheckpointError line).
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "auto":
        ckpt = read_checkpoint(ckpt_path, "ckpt_path")
        log.info("resuming %s (%s)", ckpt_path, describe(ckpt))
        return Path(ckpt_path).expanduser()
    candidates = list(runs_dir.glob("*/checkpoints/*.ckpt"))
    if not candidates:
        log.info("ckpt_path=auto: no checkpoint under %s yet; starting fresh", runs_dir)
        return None
    path, ckpt, skipped = newest_readable(candidates)
    for reason in skipped:
        log.warning("ckpt_path=auto: skipping %s", reason)
    if path is None:
        log.warning(
            "ckpt_path=auto: none of the %d checkpoints under %s is readable; starting fresh",
            len(candidates),
            runs_dir,
        )
        return None
    log.info("ckpt_path=auto: resuming %s (%s)", path, describe(ckpt))
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
