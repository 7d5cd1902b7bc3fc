"""The error a user's own input causes: one line naming the key or file, never a traceback.

Its own module, without Hydra or omegaconf, so that strategies, checkpoints and scripts can
raise it without loading the config layer."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key has an unknown name, a wrong type or an impossible value."""
