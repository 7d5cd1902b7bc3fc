"""Atomic file writes: readers (and a crash mid-write) never see half a file."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:  # (a full or read-only disk): name the file meant, not the tmp
        if err.filename != str(tmp):
            raise
        raise OSError(err.errno, err.strerror, str(path)) from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_atomic(obj: Any, path: Path) -> Path:
    """torch.save `obj` to `path` atomically. A full disk is an OSError (ENOSPC) naming `path`:
    torch's writer reports it as a RuntimeError ("unexpected pos …") that says neither."""
    try:
        return write_atomic(path, lambda tmp: torch.save(obj, tmp))
    except RuntimeError as err:
        if shutil.disk_usage(path.parent).free > 1 << 20:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err


def save_npy_atomic(array: np.ndarray, path: Path) -> Path:
    """np.save `array` to `path` (the exact name, no `.npy` appended) atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    return write_atomic(path, write)
