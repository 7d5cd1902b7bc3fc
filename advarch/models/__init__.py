"""Models: blocks stacked into backbones with heads, built from a DataSpec."""

from advarch.models.model import Model
from advarch.models.output import ModelOutput

__all__ = ["Model", "ModelOutput"]
