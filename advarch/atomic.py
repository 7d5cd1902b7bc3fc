"""Atomic file writes: readers (and a crash mid-write) never see half a file.

torch and numpy are imported where a tensor or array is written: train.py writes text before
its stop signals are held for torch's import (a Ctrl-C inside torch's C++ aborts the process).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`.

    An OSError of the temporary file (a read-only folder, a full disk: a write's error names no
    file) is raised naming `path`, the file the caller meant.
    """
    with contextlib.suppress(FileExistsError):  # a file in the folder's place: ENOTDIR below
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename not in (None, str(tmp)):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        with contextlib.suppress(OSError):  # (a read-only folder refuses even this)
            tmp.unlink(missing_ok=True)
    return path


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def remove_abandoned_writes(folder: Path) -> None:
    """Delete the temporary files of `write_atomic` in `folder` whose process is gone (killed
    with -9 mid-write: a checkpoint's is as large as the checkpoint, and nothing else reads
    it)."""
    for tmp in folder.glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and tmp.is_file() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_atomic(obj: Any, path: Path) -> Path:
    """torch.save `obj` to `path` atomically, into a file Python opens: torch's own writer
    reports a folder it cannot write and a full disk as RuntimeErrors ("open file failed",
    "unexpected pos …") without errno or file; here they are OSErrors naming `path`."""
    import torch

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as err:  # torch's report of the file's own OSError
                if not isinstance(err.__context__, OSError):
                    raise
                raise OSError(err.__context__.errno, err.__context__.strerror) from err

    return write_atomic(path, write)


def save_npy_atomic(array: np.ndarray, path: Path) -> Path:
    """np.save `array` to `path` (the exact name, no `.npy` appended) atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    return write_atomic(path, write)
