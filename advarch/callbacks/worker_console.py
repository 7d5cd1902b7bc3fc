"""`worker_console` in each spawned DDP worker, before it joins the process group."""

from __future__ import annotations

from typing import Any

import lightning as L

from advarch.console_log import worker_console


class WorkerConsole(L.Callback):
    """A spawned DDP worker prints its records as the launching process does.

    The hook is unpickling: `ddp_spawn` sends the trainer (its callbacks with it) to each
    worker, which announces its rank and DDP's banner before any callback hook runs.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickled, ())  # (a stateless object's `__setstate__` is never called)


def _unpickled() -> WorkerConsole:
    from advarch.console_log import quiet_lightning_logs

    worker_console()
    quiet_lightning_logs()  # Lightning's own handler off: its records reach the console's
    return WorkerConsole()
