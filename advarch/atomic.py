"""Atomic file writes: readers (and a crash mid-write) never see half a file."""

from __future__ import annotations

import os
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
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`path.write_text(text)` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def save_atomic(obj: Any, path: Path) -> Path:
    """torch.save `obj` to `path` atomically."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_npy_atomic(array: np.ndarray, path: Path) -> Path:
    """np.save `array` to `path` (the exact name, no `.npy` appended) atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.save(f, array)

    return write_atomic(path, write)
