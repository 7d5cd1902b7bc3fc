"""One run per folder: a training run holds an exclusive lock on `<run>/.lock` while it works.

Two runs in one folder (the same `hydra.run.dir`) interleaved their logs, wrote one another's
checkpoints and died on the CSV logger; `ckpt_path=auto` resumed a run that was still
training, and both logged to one W&B run. The lock is the kernel's (`flock`): it goes with its
process, so a run killed with -9 leaves none behind, and a requeued job takes its folder back.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from advarch.errors import ConfigError

LOCK_FILE = ".lock"


class FolderInUse(ConfigError):
    """Another live process holds this run folder: nothing of it may be touched."""


def holder(folder: Path) -> str | None:
    """The process id holding `folder`'s run lock (its run is still working), or None. The
    probe's lock is shared: probes never refuse one another."""
    try:
        file = (folder / LOCK_FILE).open("r")
    except OSError:  # no lock file: no run there now
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return file.read().strip() or "unknown"
        fcntl.flock(file, fcntl.LOCK_UN)
    return None


def process_rank() -> int:
    """This process's global rank as Lightning reads it from the launcher's environment (0
    outside DDP): DDP's other processes run in rank 0's folder, under its lock. The first
    process of a node after the first (`NODE_RANK`) has no rank of its own yet."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK"):
        if key in os.environ:
            return int(os.environ[key])
    return 0


@contextlib.contextmanager
def run_folder_lock(folder: Path, key: str = "hydra.run.dir") -> Iterator[None]:
    """Hold `folder`'s run lock for the block (in rank 0 of a DDP run, `process_rank`); one
    `FolderInUse` line, advising another `key`, if another live process holds it."""
    if process_rank() != 0:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    locked = _lock(path)
    if isinstance(locked, str):
        raise FolderInUse(in_use(folder, locked, key))
    with locked as file:
        file.truncate(0)
        file.write(str(os.getpid()))
        file.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # (still locked: no other run takes it meanwhile)


def _lock(path: Path, patience_s: float = 0.5) -> TextIO | str:
    """`path` opened and exclusively locked, or the process id of the live run holding it.

    A `holder` probe holds the lock for microseconds: it is waited for. A lock taken on a file
    its run unlinked as it released it is no lock (the next run would create and lock a new
    file): it is taken again on the file now at `path`.
    """
    deadline = time.monotonic() + patience_s
    while True:
        file = path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            pid = file.read().strip() or "unknown"
            file.close()
            if time.monotonic() >= deadline:
                return pid
            time.sleep(0.01)
            continue
        if _same_file(path, file):
            return file
        file.close()


def _same_file(path: Path, file: TextIO) -> bool:
    """Whether `file` is still the one at `path` (not unlinked since it was opened)."""
    try:
        return path.stat().st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def in_use(folder: Path | str, pid: str, key: str) -> str:
    """The one line refusing a folder another run works in."""
    return (f"{folder} is in use by another run (process {pid}): give this one its own folder "
            f"(another {key}, or leave it out)")  # fmt: skip


# what a run leaves in its folder besides Hydra's `.hydra/` and `train.log`, which a new run
# there rewrites before any of advarch's code runs
RUN_FILES = ("checkpoints/*.ckpt", "csv/version_*/metrics.csv", "summary.json")
PRINT_ONLY = {"--cfg", "-c", "--help", "-h", "--hydra-help", "--info", "-i", "--resolve"}


def earlier_run_file(folder: Path, sweep: bool = False) -> Path | None:
    """A file another run left in `folder` (in a trial's folder of it: `sweep`), or None."""
    patterns = [f"*/{p}" for p in RUN_FILES] if sweep else RUN_FILES
    return next((f for p in patterns for f in sorted(folder.glob(p))), None)


def _typed_values(argv: list[str]) -> dict[str, str]:
    """key → value of a command line's plain overrides (not flags, not `+key=`)."""
    return dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith(("-", "+")))


def typed_run_folder(argv: list[str]) -> Path | None:
    """The folder a single run's command line names (`hydra.run.dir=…`, no interpolation)."""
    if any(a in ("-m", "--multirun") for a in argv):
        return None
    given = _typed_values(argv)
    folder = given.get("hydra.run.dir", "").strip("'\"")
    return Path(folder) if folder and "${" not in folder else None


def check_new_folder(argv: list[str]) -> None:
    """Raise `ConfigError` for a command line that puts a new run in a folder holding another
    (`hydra.run.dir=x` typed twice, a sweep's `hydra.sweep.dir`): its CSV got both runs' rows,
    Lightning added `-v1` checkpoints beside the first run's and Hydra rewrote its `.hydra/`.
    A resume goes on in its own folder (`ckpt_path=auto`, or a checkpoint inside it). And for
    `paths.output_dir`, which moved the checkpoints and CSV but not `.hydra/` or `train.log`."""
    if process_rank() != 0 or set(argv) & PRINT_ONLY:  # (DDP's other processes: rank 0's)
        return
    given = _typed_values(argv)
    if "paths.output_dir" in given:
        raise ConfigError(
            f"paths.output_dir={given['paths.output_dir']}: a run's folder is the one Hydra makes "
            "for its .hydra/ and train.log too; choose it with hydra.run.dir=<folder> "
            "(hydra.sweep.dir=<folder> with -m)"
        )
    sweep = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    folder_text = given.get(key, "").strip("'\"")
    if not folder_text or "${" in folder_text:
        return
    folder, ckpt = Path(folder_text), given.get("ckpt_path", "").strip("'\"")  # (Hydra: no ~)
    pid = None if sweep else holder(folder)
    if pid is not None:  # (a resume too: Hydra would rewrite its .hydra/ before the job refused)
        raise FolderInUse(in_use(folder, pid, key))
    if (
        ckpt == "auto"
        or ckpt
        and Path(ckpt).expanduser().resolve().is_relative_to(folder.resolve())
    ):
        return
    found = earlier_run_file(folder, sweep)
    if found is None:
        return
    run = folder / found.relative_to(folder).parts[0] if sweep else folder
    pid = holder(run)
    if pid is not None:  # (still training there: not to be resumed either)
        raise FolderInUse(in_use(run, pid, key))
    last = folder / "checkpoints" / "last.ckpt"
    if sweep:
        resume = ", or rerun the same grid with ckpt_path=auto to resume its trials"
    else:
        resume = f", or resume that run with ckpt_path={last}" if last.is_file() else ""
    raise ConfigError(
        f"{key}={folder_text} already holds a run ({found.relative_to(folder)}): a new one there "
        f"would add to its CSV and checkpoints; choose an empty folder{resume}"
    )
