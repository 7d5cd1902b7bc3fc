"""The blocks' Triton kernel modules, imported on first use: None where Triton is not installed.

Blocks import these lazily so CPU-only installs never import Triton; a module that fails to
import while Triton is installed raises (a broken kernel must not silently fall back).
Under `torch.compile` the lookup is one constant, not a graph break in every layer.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch

_TRITON = importlib.util.find_spec("triton") is not None  # (found, not imported)


@torch.compiler.assume_constant_result
def triton_installed() -> bool:
    return _TRITON


def triton_module(name: str) -> ModuleType | None:
    """`advarch.models.blocks.<name>`, or None without Triton."""
    if not triton_installed():
        return None
    full = f"advarch.models.blocks.{name}"
    return sys.modules.get(full) or importlib.import_module(full)
