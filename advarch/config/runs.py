"""Finding checkpoints and W&B ids of earlier runs, for `ckpt_path=auto` and resumes."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from advarch.checkpoint import (
    CheckpointError,
    describe,
    newest_readable,
    read_checkpoint,
    saved_config,
)

log = logging.getLogger("advarch")

WANDB_ID_FILE = "wandb_id.txt"


def resolve_checkpoint(
    ckpt_path: str | None, runs_dir: Path, output_dir: Path | None = None
) -> Path | None:
    """The checkpoint a run resumes from, and a log line saying which (or why none).

    `None` → fresh start; `auto` → the newest readable checkpoint of this run name
    (`<runs_dir>/*/checkpoints/*.ckpt`, and the run's own `<output_dir>/checkpoints/`, where a
    requeued cluster job finds its own; newest first; unreadable ones are skipped with a
    warning); anything else must be a readable checkpoint file (one CheckpointError line).
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "auto":
        ckpt = read_checkpoint(ckpt_path, "ckpt_path")
        saved_config(ckpt, ckpt_path)
        if "loops" not in ckpt:
            raise CheckpointError(
                f"ckpt_path={ckpt_path!r} holds weights without training state (no loops, "
                "optimizer); to start from these weights use strategy=finetune "
                f"strategy.pretrained={ckpt_path}"
            )
        log.info("resuming %s (%s)", ckpt_path, describe(ckpt))
        return Path(ckpt_path).expanduser()
    candidates = set(runs_dir.glob("*/checkpoints/*.ckpt"))
    if output_dir is not None:
        candidates |= set(output_dir.glob("checkpoints/*.ckpt"))
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


def discard_run_folder() -> None:
    """Remove what Hydra and advarch wrote into this job's run folder when it did no work (a
    config error): `.hydra/`, the job log and the config tree, then the folder itself if
    nothing else is in it."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    if (folder / "checkpoints").exists():
        return
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    for name in (f"{hydra_cfg.job.name}.log", "train.log", "config_tree.txt"):
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when nothing else is in it
