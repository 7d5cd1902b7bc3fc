"""The blocks' Triton kernel modules, imported on first use: None where Triton is not installed.

Blocks import these lazily so CPU-only installs never import Triton; a module that fails to
import while Triton is installed raises (a broken kernel must not silently fall back).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """`advarch.models.blocks.<name>`, or None without Triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module(f"advarch.models.blocks.{name}")
