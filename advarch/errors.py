"""The error a user's own input causes: one line naming the key or file, never a traceback.

Its own module, without Hydra or omegaconf, so that strategies, checkpoints and scripts can
raise it without loading the config layer."""

from __future__ import annotations

import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """A config key has an unknown name, a wrong type or an impossible value."""


def exit_on_config_error(work: Callable[[], None]) -> None:
    """Run a command line's `work`; a bad config key or value ends it with one `error:` line."""
    try:
        work()
    except ConfigError as err:
        sys.exit(f"error: {err}")
