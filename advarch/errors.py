"""The error a user's own input causes: one line naming the key or file, never a traceback.

Its own module, without Hydra or omegaconf, so that strategies, checkpoints and scripts can
raise it without loading the config layer."""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable

# a disk's refusals, said in one line naming the file: full, over quota, a file-size limit
# (`ulimit -f`, FAT32's 4 GiB), read-only, a folder without write permission
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)


class ConfigError(ValueError):
    """A config key has an unknown name, a wrong type or an impossible value."""


def exit_on_config_error(work: Callable[[], None]) -> None:
    """Run a command line's `work`; a bad config key or value ends it with one `error:` line."""
    try:
        work()
    except ConfigError as err:
        sys.exit(f"error: {err}")
