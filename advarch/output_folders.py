"""The run's (or sweep's) output folder made before Hydra makes it: one line if it cannot be,
or if another run works in it.

Hydra creates `hydra.run.dir` (or the sweep's folder) and writes `.hydra/` into it before any
advarch code runs, so a read-only or missing parent ended the command in a chain of
`pathlib.mkdir` tracebacks, and a second run in a live run's folder rewrote that run's
recorded config before its lock (`advarch.run_lock`) refused it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from advarch.atomic import write_atomic
from advarch.config.compose import CONFIG_DIR
from advarch.config.resolvers import register_resolvers
from advarch.errors import ConfigError
from advarch.run_lock import holder, in_use, process_rank


class OutputFolder(Callback):
    """Hydra callback: make the run or sweep folder first; `error: cannot write …` if not."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _make(config, "hydra.sweep.dir")


def _make(config: DictConfig, key: str) -> None:
    """Make the folder `key` names; its `${now:}` and `${unique:}` are cached in `config`, so
    Hydra resolves the same folder after."""
    HydraConfig.instance().set_config(config)  # (${hydra:…} in run_name; the job sets it again)
    folder = OmegaConf.select(config, key, throw_on_resolution_failure=False)
    if folder is None:
        return  # (Hydra says why when it resolves it)
    try:
        check_writable(Path(folder), key)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    if process_rank() != 0:
        return  # (DDP's other processes run in rank 0's folder)
    trials = [p for p in Path(folder).iterdir() if p.is_dir()] if key == "hydra.sweep.dir" else []
    for run in (Path(folder), *trials):
        pid = holder(run)
        if pid is not None:
            sys.exit(f"error: {in_use(run, pid, key)}")


PROBE_BYTES = 64 << 10  # more than Hydra's `.hydra/` files and a run's first log lines


def check_writable(folder: Path, key: str, keep: bool = True) -> None:
    """Check that `folder` (the config's `key`, e.g. `paths.cache_dir`) exists or can be made,
    and takes a probe's bytes: a ConfigError naming the key where not (a file in the way, no
    permission, a full disk), before any work; a cache's data builds failed in a traceback or
    a line naming no key. A folder that exists is taken as it is (a built cache on a read-only
    disk is read); one made here is removed again unless `keep`."""
    if folder.is_dir() and not keep:
        return
    problem = unmakeable(folder)  # (a file in the way: said so, not `File exists`)
    if problem:
        raise ConfigError(f"cannot write {key}={folder}: it {problem} (choose another {key})")
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        for tries_left in (2, 1, 0):
            try:
                folder.mkdir(parents=True, exist_ok=True)
                _write_probe(folder)
                break
            except FileNotFoundError:  # a run starting beside this one found no folder either,
                if not tries_left:  # made it, probed it and removed it again: make it anew
                    raise
    except OSError as err:
        reason = err.strerror or type(err).__name__
        free = "free space, or " if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise ConfigError(f"cannot write {key}={folder}: {reason} ({free}choose another {key})"
                          ) from None  # fmt: skip
    finally:
        for path in made if not keep else ():  # (deepest first: nothing left behind)
            with contextlib.suppress(OSError):
                path.rmdir()


def _write_probe(folder: Path) -> None:
    """Write and remove `PROBE_BYTES` in `folder`: a full disk (or quota) raises here, where
    Hydra writing `.hydra/config.yaml` next would end in its traceback."""
    probe = folder / f".space_probe_{os.getpid()}"
    try:
        probe.write_bytes(bytes(PROBE_BYTES))
    finally:
        probe.unlink(missing_ok=True)


def unmakeable(folder: Path) -> str | None:
    """Why `folder` cannot be made or written into (a file where it or a folder above it goes,
    or no write permission there), else None. Nothing is made: a program checks its output
    folder before its work and leaves nothing behind when it refuses."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return "is a file, not a folder" if existing == folder else f"is inside {existing}, a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return "is not writable" if existing == folder else f"cannot be made in {existing}"
    return None


def exit_if_unmakeable(folder: Path, option: str = "--out") -> None:
    """Exit with one `error: <option> <folder> <why>` line where `unmakeable(folder)`: the
    check a program's output-folder option gets before any work."""
    problem = unmakeable(Path(folder))
    if problem:
        sys.exit(f"error: {option} {folder} {problem}")


def stamped_folder(parent: Path) -> Path:
    """`parent/<time>_<id>`, named by the pattern that names train.py's run folders (the last
    part of the packaged `hydra.run.dir`), so that a script's reruns never share a folder."""
    hydra = OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / "hydra" / "default.yaml"))
    pattern = Path(hydra["run"]["dir"]).name
    setup_globals()  # Hydra's `${now:}`
    register_resolvers()  # advarch's `${unique:}`
    return Path(parent) / OmegaConf.create({"name": pattern}).name


RECORDS: dict[Path, dict[Path, bytes]] = {}  # a typed run folder → its `.hydra/*.yaml` as found


def remember_record(folder: Path) -> None:
    """Keep the `.hydra/` files of a run folder this command goes into (a resume typed into
    it): Hydra rewrites them as the job starts, and a refusal puts them back
    (`discard_run_folder`), so that the folder keeps the record of the run it holds."""
    files = {path: path.read_bytes() for path in (folder / ".hydra").glob("*.yaml")}
    if files:
        RECORDS[folder.resolve()] = files


def discard_run_folder(folder: Path | None = None, root: Path | None = None) -> None:
    """Remove what Hydra and advarch wrote into a run folder that keeps no results (a config
    error; any generate.py call): `.hydra/`, the job log and the config tree, then the folder
    itself (with the empty folders in it) and the parents it leaves empty inside `root`
    (`outputs/runs/…`; default: the folder the command was started in, Hydra's runtime.cwd).
    `folder` defaults to the current Hydra job's output folder (eval, generate, merge)."""
    import shutil

    job = HydraConfig.get() if HydraConfig.initialized() else None
    if folder is None:
        if job is None:
            return
        folder = Path(job.runtime.output_dir)
    record = RECORDS.pop(folder.resolve(), None)
    for path, data in (record or {}).items():  # (a folder that held a run: its own record)
        write_atomic(path, lambda tmp, data=data: tmp.write_bytes(data))
    if record or (folder / "checkpoints").exists():
        return
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    logs = {"train.log", f"{job.job.name}.log"} if job is not None else {"train.log"}
    for name in (*logs, "config_tree.txt"):
        (folder / name).unlink(missing_ok=True)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()  # empty folders a logger made before the error (csv/version_0)
    # the folder, then the parents it leaves empty inside root (outputs/runs/<run name>,
    # outputs/runs, outputs): never root, the folder the command was started in (the shell's
    # working folder went with them) or one above them, nor a parent outside root (the user's)
    shell = Path(job.runtime.cwd if job is not None else Path.cwd()).resolve()
    top, run = (shell if root is None else Path(root)).resolve(), folder.resolve()
    kept = {top, shell, *top.parents, *shell.parents}
    for path in (run, *run.parents):
        if path in kept or (path != run and top not in path.parents):
            break
        try:
            path.rmdir()  # only when empty
        except OSError:
            break
